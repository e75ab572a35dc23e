// Raises thread stack sizes that are too small for a Kennel process.
//
// A thread's stack also holds the static TLS of every library loaded at
// start-up. LibTorch pulls in OpenBLAS (60 KiB of TLS) and glog (30 KiB), so
// a process that links LibTorch needs about 100 KiB for TLS alone, and
// glibc's pthread_create refuses (EINVAL) any smaller stack. Debian's
// civetweb, which serves /metrics through prometheus-cpp, asks for exactly
// 100 KiB, so its threads could not start. Linked into the executable and
// exported, this definition takes precedence over libc's for every library
// and sets a floor of 1 MiB; larger requests pass through unchanged.
#include <dlfcn.h>
#include <pthread.h>

#include <algorithm>
#include <cstddef>

extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr,
                                         size_t size) __THROW {
  using Fn = int (*)(pthread_attr_t*, size_t);
  static const Fn real =
      reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  constexpr size_t kFloor = size_t{1} << 20;
  return real(attr, std::max(size, kFloor));
}
