// kennel dataset: turns public data sets installed on this machine into the
// ImageFolder layout the trainer reads (train/ valid/ test/, one folder per
// class named "NNN.Label").
#include <zlib.h>

#include <cstdint>
#include <filesystem>
#include <iostream>
#include <opencv2/core/mat.hpp>
#include <opencv2/imgcodecs.hpp>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "common/status.h"
#include "services/cli/command.h"

ABSL_FLAG(std::string, source, "/usr/share/datasets/fashion-mnist",
          "kennel dataset: folder holding the idx .gz files (Debian's "
          "dataset-fashion-mnist package installs them here).");
ABSL_FLAG(int, limit, 0,
          "kennel dataset: at most this many images per class in each split "
          "(0: all), for small test sets. kennel jobs ls: at most this many "
          "jobs (0: the trainer's default, 50).");
ABSL_FLAG(int, valid_size, 10000,
          "kennel dataset: the last this many training images form valid/.");
ABSL_FLAG(std::string, classes, "",
          "kennel dataset: comma-separated class indices to keep (e.g. "
          "0,1,2,3,4); empty keeps all ten.");

namespace kennel::cli {
namespace {

namespace fs = std::filesystem;

// Folder names carry the class index, so sorted order is label order, and
// the label is what follows the dot ("000.T-shirt_top" -> "T-shirt_top").
constexpr const char* kFashionClasses[10] = {
    "000.T-shirt_top", "001.Trouser",   "002.Pullover", "003.Dress",
    "004.Coat",        "005.Sandal",    "006.Shirt",    "007.Sneaker",
    "008.Bag",         "009.Ankle_boot"};

absl::StatusOr<std::string> ReadGzip(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) {
    return absl::NotFoundError(absl::StrCat(
        "cannot open ", path,
        " (install Debian's dataset-fashion-mnist, or pass --source)"));
  }
  std::string out;
  char buffer[1 << 16];
  int n;
  while ((n = gzread(file, buffer, sizeof(buffer))) > 0) out.append(buffer, n);
  int err = 0;
  const char* message = gzerror(file, &err);
  gzclose(file);
  if (n < 0 || err < 0) {
    return absl::DataLossError(absl::StrCat(path, ": ", message));
  }
  return out;
}

uint32_t BigEndian32(const std::string& bytes, size_t offset) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data() + offset);
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) |
         (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

struct IdxImages {
  int count = 0;
  int rows = 0;
  int cols = 0;
  std::string data;  // count * rows * cols bytes
};

// The idx format: a magic number (0x0803 images, 0x0801 labels), big-endian
// dimensions, then unsigned bytes.
absl::StatusOr<IdxImages> ReadIdxImages(const std::string& path) {
  ASSIGN_OR_RETURN(std::string bytes, ReadGzip(path));
  if (bytes.size() < 16 || BigEndian32(bytes, 0) != 0x0803) {
    return absl::DataLossError(path + " is not an idx image file");
  }
  IdxImages images;
  images.count = BigEndian32(bytes, 4);
  images.rows = BigEndian32(bytes, 8);
  images.cols = BigEndian32(bytes, 12);
  const size_t want = size_t(images.count) * images.rows * images.cols;
  if (bytes.size() != 16 + want) {
    return absl::DataLossError(path + " is truncated");
  }
  images.data = bytes.substr(16);
  return images;
}

absl::StatusOr<std::string> ReadIdxLabels(const std::string& path) {
  ASSIGN_OR_RETURN(std::string bytes, ReadGzip(path));
  if (bytes.size() < 8 || BigEndian32(bytes, 0) != 0x0801 ||
      bytes.size() != 8 + BigEndian32(bytes, 4)) {
    return absl::DataLossError(path + " is not an idx label file");
  }
  return bytes.substr(8);
}

struct SplitRange {
  std::string name;
  const IdxImages* images;
  const std::string* labels;
  int begin;
  int end;
  std::string prefix;
};

absl::Status WriteSplit(const SplitRange& split, const fs::path& out,
                        const std::set<int>& keep, int limit,
                        std::vector<int>* written) {
  std::vector<int> per_class(10, 0);
  std::vector<uchar> png;
  for (int i = split.begin; i < split.end; ++i) {
    const int label = static_cast<unsigned char>((*split.labels)[i]);
    if (label > 9) {
      return absl::DataLossError(absl::StrCat("label ", label, " at ", i));
    }
    if (!keep.empty() && !keep.count(label)) continue;
    if (limit > 0 && per_class[label] >= limit) continue;
    const fs::path dir = out / split.name / kFashionClasses[label];
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) {
      return absl::InternalError(
          absl::StrCat("cannot create ", dir.string(), ": ", ec.message()));
    }
    const int side = split.images->rows * split.images->cols;
    cv::Mat image(
        split.images->rows, split.images->cols, CV_8UC1,
        const_cast<char*>(split.images->data.data()) + size_t(i) * side);
    const fs::path file = dir / absl::StrFormat("%s_%05d.png", split.prefix, i);
    try {
      if (!cv::imwrite(file.string(), image)) {
        return absl::InternalError("cannot write " + file.string());
      }
    } catch (const cv::Exception& e) {
      return absl::InternalError(
          absl::StrCat("writing ", file.string(), ": ", e.what()));
    }
    ++per_class[label];
    ++(*written)[label];
  }
  return absl::OkStatus();
}

int RunFashionMnist(const std::string& out_dir) {
  const std::string source = absl::GetFlag(FLAGS_source);
  const int limit = absl::GetFlag(FLAGS_limit);
  const int valid_size = absl::GetFlag(FLAGS_valid_size);
  if (limit < 0) return UsageError("--limit must be >= 0");
  std::set<int> keep;
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_classes), ',', absl::SkipEmpty())) {
    int index;
    if (!absl::SimpleAtoi(part, &index) || index < 0 || index > 9) {
      return UsageError(
          absl::StrCat("--classes: \"", part, "\" is not a class index 0-9"));
    }
    keep.insert(index);
  }

  auto train = ReadIdxImages(source + "/train-images-idx3-ubyte.gz");
  if (!train.ok()) return Fail(train.status());
  auto train_labels = ReadIdxLabels(source + "/train-labels-idx1-ubyte.gz");
  if (!train_labels.ok()) return Fail(train_labels.status());
  auto test = ReadIdxImages(source + "/t10k-images-idx3-ubyte.gz");
  if (!test.ok()) return Fail(test.status());
  auto test_labels = ReadIdxLabels(source + "/t10k-labels-idx1-ubyte.gz");
  if (!test_labels.ok()) return Fail(test_labels.status());
  if (train_labels->size() != size_t(train->count) ||
      test_labels->size() != size_t(test->count)) {
    return Fail(absl::DataLossError("image and label counts differ"));
  }
  if (valid_size <= 0 || valid_size >= train->count) {
    return UsageError(
        absl::StrCat("--valid-size must be in 1..", train->count - 1));
  }

  const int split_at = train->count - valid_size;
  const std::vector<SplitRange> splits = {
      {"train", &*train, &*train_labels, 0, split_at, "train"},
      {"valid", &*train, &*train_labels, split_at, train->count, "train"},
      {"test", &*test, &*test_labels, 0, test->count, "test"},
  };
  std::vector<std::vector<std::string>> rows = {{"SPLIT", "IMAGES", "SOURCE"}};
  for (const SplitRange& split : splits) {
    std::vector<int> written(10, 0);
    if (absl::Status s = WriteSplit(split, out_dir, keep, limit, &written);
        !s.ok()) {
      return Fail(s);
    }
    int total = 0;
    for (int n : written) total += n;
    rows.push_back(
        {split.name, absl::StrCat(total),
         absl::StrCat(split.prefix == "train" ? "train" : "t10k", " images ",
                      split.begin, "..", split.end - 1)});
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << "{\"out\": \"" << out_dir << "\", \"splits\": {";
    for (size_t i = 1; i < rows.size(); ++i) {
      std::cout << (i > 1 ? ", " : "") << "\"" << rows[i][0]
                << "\": " << rows[i][1];
    }
    std::cout << "}}\n";
  } else {
    std::cout << Table(rows);
  }
  return kExitOk;
}

int RunDataset(const std::vector<std::string>& args) {
  if (args.size() != 2 || args[0] != "fashion-mnist") {
    return UsageError("usage: kennel dataset fashion-mnist OUTDIR");
  }
  return RunFashionMnist(args[1]);
}

KENNEL_CLI_COMMAND(
    {"dataset", "write a public data set as train/valid/test image folders",
     "Usage: kennel dataset fashion-mnist OUTDIR [--limit N] [--classes "
     "0,1,...]\n"
     "                     [--valid-size N] [--source DIR]\n\n"
     "Converts Fashion-MNIST (Debian's dataset-fashion-mnist package, idx "
     "files under\n/usr/share/datasets/fashion-mnist/) into the ImageFolder "
     "layout kennel-trainer reads:\n"
     "  OUTDIR/train/000.T-shirt_top/train_00000.png ...\n"
     "Split: the first 50,000 training images are train/, the last 10,000 "
     "(--valid-size)\nare valid/, and the 10,000 t10k images are test/. Each "
     "image is a 28x28 grey PNG\nnamed after its index in the source file. "
     "Class folders are 000.T-shirt_top,\n001.Trouser, 002.Pullover, "
     "003.Dress, 004.Coat, 005.Sandal, 006.Shirt, 007.Sneaker,\n008.Bag and "
     "009.Ankle_boot.\n\n"
     "Flags:\n"
     "  --limit N        at most N images per class in each split (0: all)\n"
     "  --classes LIST   keep only these class indices, e.g. 0,1,2,3,4\n"
     "  --valid-size N   size of valid/, taken from the end of the training "
     "file\n"
     "  --source DIR     where the .gz idx files are\n"
     "  --json           print the counts as JSON\n",
     &RunDataset});

}  // namespace
}  // namespace kennel::cli
