#include "services/trainer/dataset.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <system_error>

#include "absl/strings/ascii.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/sha256.h"
#include "common/status.h"

namespace kennel::trainer {
namespace {

namespace fs = std::filesystem;

bool IsUnder(const fs::path& root, const fs::path& path) {
  auto r = root.begin();
  auto p = path.begin();
  for (; r != root.end(); ++r, ++p) {
    if (r->empty()) continue;  // a trailing separator
    if (p == path.end() || *r != *p) return false;
  }
  return true;
}

// A few names for an error message, so one bad folder of thousands does not
// produce a message longer than a status can carry.
std::string Some(const std::vector<std::string>& names) {
  constexpr size_t kShown = 5;
  std::vector<std::string> shown(
      names.begin(), names.begin() + std::min(kShown, names.size()));
  std::string out = absl::StrJoin(shown, ", ");
  if (names.size() > kShown) {
    absl::StrAppend(&out, " and ", names.size() - kShown, " more");
  }
  return out;
}

// The canonical form of an entry found while scanning, checked against the
// root so that a symlink inside the data set cannot reach other files.
absl::StatusOr<fs::path> CheckedEntry(const fs::path& root,
                                      const fs::directory_entry& entry) {
  std::error_code ec;
  fs::path real = fs::canonical(entry.path(), ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot resolve ", entry.path().string(), ": ", ec.message()));
  }
  if (!IsUnder(root, real)) {
    return absl::InvalidArgumentError(absl::StrCat(
        entry.path().string(), " is a link to ", real.string(),
        ", which is outside the trainer's --data-root ", root.string()));
  }
  return real;
}

// Strict UTF-8: no overlong forms, no surrogates, nothing past U+10FFFF.
bool IsUtf8(absl::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int more;
    unsigned int code;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      more = 1;
      code = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      more = 2;
      code = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      more = 3;
      code = c & 0x07;
    } else {
      return false;
    }
    if (i + more >= s.size()) return false;  // cut short
    for (int k = 1; k <= more; ++k) {
      const unsigned char d = static_cast<unsigned char>(s[i + k]);
      if ((d & 0xC0) != 0x80) return false;
      code = (code << 6) | (d & 0x3F);
    }
    static constexpr unsigned int kMin[] = {0, 0x80, 0x800, 0x10000};
    if (code < kMin[more] || code > 0x10FFFF ||
        (code >= 0xD800 && code <= 0xDFFF)) {
      return false;
    }
    i += more + 1;
  }
  return true;
}

struct ScannedSplit {
  // class folder -> image paths, sorted
  std::vector<std::pair<std::string, std::vector<std::string>>> classes;
};

absl::StatusOr<ScannedSplit> ScanSplit(const fs::path& root,
                                       const fs::path& dir) {
  ScannedSplit out;
  std::error_code ec;
  fs::directory_iterator it(dir, ec);
  if (ec) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot list ", dir.string(), ": ", ec.message()));
  }
  for (const fs::directory_entry& entry : it) {
    const std::string name = entry.path().filename().string();
    if (name.empty() || name[0] == '.') continue;
    ASSIGN_OR_RETURN(fs::path real, CheckedEntry(root, entry));
    if (!fs::is_directory(real, ec)) continue;
    // Class folder names become labels, which travel as protobuf strings:
    // bytes that are not UTF-8 would make every event of the job unreadable
    // to clients.
    if (!IsUtf8(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "class folder \"", absl::CHexEscape(name), "\" in ", dir.string(),
          " is not valid UTF-8; rename it, since its name becomes a label"));
    }
    std::vector<std::string> files;
    fs::directory_iterator files_it(real, ec);
    if (ec) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot list ", entry.path().string(), ": ", ec.message()));
    }
    for (const fs::directory_entry& file : files_it) {
      const std::string file_name = file.path().filename().string();
      if (file_name.empty() || file_name[0] == '.' ||
          !HasImageExtension(file_name)) {
        continue;
      }
      ASSIGN_OR_RETURN(fs::path real_file, CheckedEntry(root, file));
      if (!fs::is_regular_file(real_file, ec)) continue;
      files.push_back(real_file.string());
    }
    std::sort(files.begin(), files.end());
    out.classes.emplace_back(name, std::move(files));
  }
  std::sort(out.classes.begin(), out.classes.end());
  return out;
}

std::vector<std::string> ClassNames(const ScannedSplit& split) {
  std::vector<std::string> names;
  for (const auto& [name, files] : split.classes) names.push_back(name);
  return names;
}

absl::Status SameClasses(const std::string& a_name, const ScannedSplit& a,
                         const std::string& b_name, const ScannedSplit& b) {
  const std::vector<std::string> a_classes = ClassNames(a);
  const std::vector<std::string> b_classes = ClassNames(b);
  if (a_classes == b_classes) return absl::OkStatus();
  std::vector<std::string> only_a, only_b;
  std::set_difference(a_classes.begin(), a_classes.end(), b_classes.begin(),
                      b_classes.end(), std::back_inserter(only_a));
  std::set_difference(b_classes.begin(), b_classes.end(), a_classes.begin(),
                      a_classes.end(), std::back_inserter(only_b));
  std::string message = absl::StrCat("class folders differ between ", a_name,
                                     "/ and ", b_name, "/");
  if (!only_a.empty()) {
    absl::StrAppend(&message, "; only in ", a_name, "/: ", Some(only_a));
  }
  if (!only_b.empty()) {
    absl::StrAppend(&message, "; only in ", b_name, "/: ", Some(only_b));
  }
  return absl::InvalidArgumentError(message);
}

Split ToSplit(const std::string& name, const ScannedSplit& scanned) {
  Split split;
  split.name = name;
  for (size_t label = 0; label < scanned.classes.size(); ++label) {
    for (const std::string& path : scanned.classes[label].second) {
      split.images.push_back({path, static_cast<int>(label)});
    }
  }
  return split;
}

}  // namespace

std::string LabelFromFolder(absl::string_view folder) {
  size_t digits = 0;
  while (digits < folder.size() && absl::ascii_isdigit(folder[digits])) {
    ++digits;
  }
  if (digits > 0 && digits + 1 < folder.size() &&
      (folder[digits] == '.' || folder[digits] == '_' ||
       folder[digits] == '-')) {
    return std::string(folder.substr(digits + 1));
  }
  return std::string(folder);
}

bool HasImageExtension(absl::string_view filename) {
  const size_t dot = filename.rfind('.');
  if (dot == absl::string_view::npos) return false;
  const std::string ext = absl::AsciiStrToLower(filename.substr(dot + 1));
  return ext == "jpg" || ext == "jpeg" || ext == "png" || ext == "webp" ||
         ext == "bmp";
}

absl::StatusOr<std::string> ResolveUnderRoot(const std::string& data_root,
                                             const std::string& path,
                                             absl::string_view what) {
  if (data_root.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "this kennel-trainer was started without --data-root, so it reads no "
        "local ",
        what, "; start it with --data-root DIR or use an s3:// location"));
  }
  if (path.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("no ", what, " given"));
  }
  std::error_code ec;
  const fs::path root = fs::canonical(data_root, ec);
  if (ec) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--data-root ", data_root, " cannot be resolved: ", ec.message()));
  }
  const fs::path requested(path);
  const fs::path candidate =
      (requested.is_absolute() ? requested : root / requested)
          .lexically_normal();
  // Refuse by name first, so nothing is said about whether a file outside
  // the root exists.
  if (!IsUnder(root, candidate)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " \"", path, "\" is outside the trainer's ",
                     "--data-root ", root.string()));
  }
  if (!fs::exists(candidate, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " \"", path, "\" does not exist under --data-root ",
                     root.string()));
  }
  const fs::path real = fs::canonical(candidate, ec);
  if (ec) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cannot resolve ", what, " \"", path, "\": ", ec.message()));
  }
  if (!IsUnder(root, real)) {
    return absl::InvalidArgumentError(absl::StrCat(
        what, " \"", path, "\" is a link to ", real.string(),
        ", which is outside the trainer's --data-root ", root.string()));
  }
  return real.string();
}

namespace {

constexpr const char* kSplitNames[3] = {"train", "valid", "test"};

// Validates scanned splits and turns them into a Dataset (see
// ScanImageFolder for the rules).
absl::StatusOr<Dataset> BuildDataset(const std::string& dir,
                                     const ScannedSplit (&scanned)[3],
                                     const bool (&present)[3]) {
  for (int i = 0; i < 2; ++i) {
    if (!present[i]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "data set ", dir, " has no ", kSplitNames[i],
          "/ folder; the layout is train/, valid/ and (optionally) test/, "
          "each with one folder per class"));
    }
  }
  if (scanned[0].classes.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(dir, "/train has no class folders"));
  }
  if (scanned[0].classes.size() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, "/train has one class folder; a classifier needs at least two"));
  }
  for (int i = 1; i < 3; ++i) {
    if (present[i]) {
      RETURN_IF_ERROR(
          SameClasses(kSplitNames[0], scanned[0], kSplitNames[i], scanned[i]));
    }
  }
  std::vector<std::string> empty;
  for (const auto& [name, files] : scanned[0].classes) {
    if (files.empty()) empty.push_back(name);
  }
  if (!empty.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("no images (.jpg .jpeg .png .webp .bmp) in train/ for "
                     "class folder(s) ",
                     Some(empty)));
  }
  for (int i = 1; i < 3; ++i) {
    if (!present[i]) continue;
    size_t total = 0;
    for (const auto& [name, files] : scanned[i].classes) total += files.size();
    if (total == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("no images in ", dir, "/", kSplitNames[i]));
    }
  }
  Dataset dataset;
  dataset.dir = dir;
  dataset.class_dirs = ClassNames(scanned[0]);
  for (const std::string& folder : dataset.class_dirs) {
    dataset.labels.push_back(LabelFromFolder(folder));
  }
  dataset.train = ToSplit("train", scanned[0]);
  dataset.valid = ToSplit("valid", scanned[1]);
  if (present[2]) dataset.test = ToSplit("test", scanned[2]);
  dataset.test.name = "test";
  return dataset;
}

}  // namespace

absl::StatusOr<Dataset> ScanImageFolder(const std::string& dir,
                                        const std::string& data_root) {
  std::error_code ec;
  const fs::path root = fs::canonical(data_root, ec);
  if (ec) {
    return absl::FailedPreconditionError(absl::StrCat(
        "--data-root ", data_root, " cannot be resolved: ", ec.message()));
  }
  if (!fs::is_directory(dir, ec)) {
    return absl::InvalidArgumentError(
        absl::StrCat("data set ", dir, " is not a folder"));
  }
  ScannedSplit scanned[3];
  bool present[3] = {false, false, false};
  for (int i = 0; i < 3; ++i) {
    const fs::path split_dir = fs::path(dir) / kSplitNames[i];
    if (!fs::exists(split_dir, ec)) continue;
    ASSIGN_OR_RETURN(fs::path real,
                     CheckedEntry(root, fs::directory_entry(split_dir)));
    if (!fs::is_directory(real, ec)) {
      return absl::InvalidArgumentError(
          absl::StrCat(split_dir.string(), " is not a folder"));
    }
    ASSIGN_OR_RETURN(scanned[i], ScanSplit(root, real));
    present[i] = true;
  }
  return BuildDataset(dir, scanned, present);
}

absl::StatusOr<Dataset> DatasetFromListing(
    const std::string& dir, const std::vector<std::string>& files) {
  ScannedSplit scanned[3];
  bool present[3] = {false, false, false};
  std::map<std::string, std::vector<std::string>> by_class[3];
  for (const std::string& file : files) {
    std::vector<std::string> parts = absl::StrSplit(file, '/');
    if (parts.size() != 3 || parts[1].empty() || parts[2].empty() ||
        parts[1][0] == '.' || parts[2][0] == '.') {
      continue;
    }
    for (int i = 0; i < 3; ++i) {
      if (parts[0] != kSplitNames[i]) continue;
      present[i] = true;
      std::vector<std::string>& list = by_class[i][parts[1]];
      if (HasImageExtension(parts[2])) {
        list.push_back(absl::StrCat(dir, "/", file));
      }
    }
  }
  for (int i = 0; i < 3; ++i) {
    for (auto& [name, list] : by_class[i]) {
      std::sort(list.begin(), list.end());
      scanned[i].classes.emplace_back(name, std::move(list));
    }
  }
  return BuildDataset(dir, scanned, present);
}

absl::Status BadImageBudget::Check(
    absl::string_view split, int64_t total,
    const std::vector<std::string>& bad_paths) const {
  if (bad_paths.empty() || total <= 0) return absl::OkStatus();
  const double share = max_share > 0 ? max_share : 0.01;
  const double bad = static_cast<double>(bad_paths.size()) / total;
  if (bad <= share) return absl::OkStatus();
  return absl::FailedPreconditionError(
      absl::StrCat(bad_paths.size(), " of ", total, " images in ", split,
                   "/ could not be read (more than the allowed share of ",
                   share, "), e.g. ", Some(bad_paths)));
}

std::string DatasetFingerprint(
    const Dataset& dataset, const std::vector<std::string>& content_digests) {
  Sha256 hash;
  size_t i = 0;
  for (const Split* split : {&dataset.train, &dataset.valid, &dataset.test}) {
    for (const ImageEntry& image : split->images) {
      std::string relative = image.path;
      if (absl::StartsWith(relative, dataset.dir + "/")) {
        relative = relative.substr(dataset.dir.size() + 1);
      }
      hash.Update(relative);
      hash.Update("\n", 1);
      hash.Update(dataset.class_dirs[image.label]);
      hash.Update("\n", 1);
      if (i < content_digests.size()) hash.Update(content_digests[i]);
      hash.Update("\n", 1);
      ++i;
    }
  }
  return hash.Digest();
}

}  // namespace kennel::trainer
