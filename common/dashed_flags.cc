#include "common/dashed_flags.h"

#include <cctype>
#include <cstring>

namespace kennel {

void AcceptDashedFlags(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    char* arg = argv[i];
    if (std::strcmp(arg, "--") == 0) break;  // the rest is positional
    if (arg[0] != '-' || arg[1] != '-' || !std::isalpha(arg[2])) continue;
    for (char* p = arg + 2; *p != '\0' && *p != '='; ++p) {
      if (*p == '-') *p = '_';
    }
  }
}

}  // namespace kennel
