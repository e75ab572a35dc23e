#include "common/storage/object_store.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "common/storage/file_store.h"
#include "common/storage/s3_store.h"

namespace kennel::storage {
namespace {

thread_local std::shared_ptr<const CallLimits> current_limits;

}  // namespace

std::shared_ptr<const CallLimits> CurrentCallLimits() { return current_limits; }

ScopedCallLimits::ScopedCallLimits(std::shared_ptr<const CallLimits> limits)
    : previous_(std::move(current_limits)) {
  current_limits = std::move(limits);
}

ScopedCallLimits::~ScopedCallLimits() { current_limits = std::move(previous_); }

absl::Status ValidateKey(absl::string_view key) {
  bool ok = !key.empty() && key.size() <= 1024;
  if (ok) {
    for (absl::string_view segment : absl::StrSplit(key, '/')) {
      if (segment.empty() || segment == "." || segment == "..") {
        ok = false;
        break;
      }
      for (char c : segment) {
        bool allowed = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
                       (c >= '0' && c <= '9') || c == '.' || c == '_' ||
                       c == '-';
        if (!allowed) {
          ok = false;
          break;
        }
      }
      if (!ok) break;
    }
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid storage key \"", key.substr(0, 200), "\""));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ObjectStore::ReadAll(const std::string& key) {
  std::string out;
  RETURN_IF_ERROR(Read(key, 0, -1, [&out](absl::string_view data) {
    out.append(data.data(), data.size());
    return absl::OkStatus();
  }));
  return out;
}

absl::Status ObjectStore::ReadPieces(const std::string& key, int64_t offset,
                                     int64_t length, int64_t piece_bytes,
                                     const PieceSink& sink) {
  if (piece_bytes <= 0) {
    return absl::InvalidArgumentError("pieces must have at least one byte");
  }
  const size_t piece_size = static_cast<size_t>(piece_bytes);
  std::string piece;
  piece.reserve(piece_size);
  RETURN_IF_ERROR(Read(key, offset, length, [&](absl::string_view data) {
    while (!data.empty()) {
      const size_t n = std::min(piece_size - piece.size(), data.size());
      piece.append(data.data(), n);
      data.remove_prefix(n);
      if (piece.size() == piece_size) {
        RETURN_IF_ERROR(sink(&piece));
        piece.clear();
        if (piece.capacity() < piece_size) piece.reserve(piece_size);
      }
    }
    return absl::OkStatus();
  }));
  if (!piece.empty()) RETURN_IF_ERROR(sink(&piece));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<ObjectInfo>> ObjectStore::ListAll(
    const std::string& prefix) {
  std::vector<ObjectInfo> out;
  ListOptions options;
  options.prefix = prefix;
  while (true) {
    ASSIGN_OR_RETURN(ListResult page, List(options));
    for (ObjectInfo& info : page.objects) out.push_back(std::move(info));
    if (page.next_page_token.empty()) break;
    options.page_token = page.next_page_token;
  }
  return out;
}

absl::StatusOr<std::unique_ptr<ObjectStore>> OpenObjectStore(
    const std::string& url, const S3Settings& s3) {
  if (absl::StartsWith(url, "file://")) {
    ASSIGN_OR_RETURN(std::unique_ptr<FileStore> store,
                     FileStore::Open(url.substr(7)));
    return std::unique_ptr<ObjectStore>(std::move(store));
  }
  if (absl::StartsWith(url, "s3://")) {
    std::string rest = url.substr(5);
    size_t slash = rest.find('/');
    std::string bucket = rest.substr(0, slash);
    std::string prefix =
        slash == std::string::npos ? "" : rest.substr(slash + 1);
    ASSIGN_OR_RETURN(std::unique_ptr<S3Store> store,
                     S3Store::Open(bucket, prefix, s3));
    return std::unique_ptr<ObjectStore>(std::move(store));
  }
  return absl::InvalidArgumentError(
      "storage URL must be file:///PATH or s3://BUCKET[/PREFIX], got \"" + url +
      "\"");
}

}  // namespace kennel::storage
