// Image data sets in the ImageFolder layout (train/ valid/ test/, one folder
// per class, "001.Affenpinscher" -> label "Affenpinscher"), read from a local
// folder that must lie under the trainer's --data-root.
//
// Scanning reads directory entries only; images are decoded later, where a
// file that cannot be decoded is skipped and counted (see BadImageBudget).
// Everything here is a pure function of the file system and thread-safe.
#ifndef KENNEL_SERVICES_TRAINER_DATASET_H_
#define KENNEL_SERVICES_TRAINER_DATASET_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kennel::trainer {

struct ImageEntry {
  // Absolute path of the file (already checked to lie under the data root).
  std::string path;
  // Index into Dataset::labels.
  int label = 0;
};

struct Split {
  std::string name;  // "train", "valid" or "test"
  std::vector<ImageEntry> images;
};

struct Dataset {
  // Absolute, symlink-free path of the data set folder.
  std::string dir;
  // Class folder names in sorted order ("001.Affenpinscher", ...); the label
  // index of a class is its position here.
  std::vector<std::string> class_dirs;
  // Human labels, parallel to class_dirs ("Affenpinscher", ...).
  std::vector<std::string> labels;
  Split train;
  Split valid;
  // Empty when the data set has no test/ folder.
  Split test;

  int num_classes() const { return static_cast<int>(labels.size()); }
};

// "001.Affenpinscher" -> "Affenpinscher"; a folder without a numeric prefix
// keeps its whole name.
std::string LabelFromFolder(absl::string_view folder);

// True for the file extensions the image pipeline decodes (jpg, jpeg, png,
// webp, bmp; any case).
bool HasImageExtension(absl::string_view filename);

// Resolves `path` (relative to `data_root`, or absolute) to an absolute,
// symlink-free path and checks that it lies inside `data_root`.
// INVALID_ARGUMENT when it does not exist, is outside the root (symlinks
// included), or when no data root is configured.
absl::StatusOr<std::string> ResolveUnderRoot(const std::string& data_root,
                                             const std::string& path,
                                             absl::string_view what);

// Scans `dir` (already resolved) as an ImageFolder data set. Validates the
// layout: train/ and valid/ exist (test/ is optional), every split has the
// same class folders, every class of every split has at least one image
// file, and no entry escapes `data_root` through a symlink. Files that are
// not images by extension are ignored. Errors are INVALID_ARGUMENT with a
// message naming the offending folder.
absl::StatusOr<Dataset> ScanImageFolder(const std::string& dir,
                                        const std::string& data_root);

// Images that could not be read, per split (their paths).
struct BadImages {
  std::vector<std::string> train, valid, test;
  size_t total() const { return train.size() + valid.size() + test.size(); }
};

// The same validation over a listing of relative file names
// ("train/001.Cat/a.jpg", ...), for data sets that live in an object store;
// the images' paths are dir + "/" + name. Names that are not
// split/class/file are ignored.
absl::StatusOr<Dataset> DatasetFromListing(
    const std::string& dir, const std::vector<std::string>& files);

// Counts images that could not be decoded in one split and decides when a
// job must give up on the data set.
struct BadImageBudget {
  // Share of a split's images that may be bad before the job fails (0.01
  // when zero is configured).
  double max_share = 0.01;

  // FAILED_PRECONDITION naming the split and a few of the bad files when
  // bad / total exceeds max_share.
  absl::Status Check(absl::string_view split, int64_t total,
                     const std::vector<std::string>& bad_paths) const;
};

// sha256 over the data set's relative file names, labels and the content
// digests of its files ("sha256:<hex>"), so two data sets with the same
// images in the same classes have the same fingerprint. `content_digests`
// is parallel to train, valid, test images concatenated.
std::string DatasetFingerprint(const Dataset& dataset,
                               const std::vector<std::string>& content_digests);

}  // namespace kennel::trainer

#endif  // KENNEL_SERVICES_TRAINER_DATASET_H_
