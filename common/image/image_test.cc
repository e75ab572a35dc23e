#include "common/image/image.h"

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_split.h"

namespace kennel::image {
namespace {

using ::kennel::v1::Preprocessing;

std::string Encode(const cv::Mat& bgr, const std::string& ext,
                   const std::vector<int>& params = {}) {
  std::vector<uchar> buf;
  EXPECT_TRUE(cv::imencode(ext, bgr, buf, params));
  return std::string(buf.begin(), buf.end());
}

// A BGR test picture with a different colour in each quadrant, so that
// rotations and channel swaps show.
cv::Mat Quadrants(int width, int height) {
  cv::Mat img(height, width, CV_8UC3);
  for (int y = 0; y < height; ++y) {
    for (int x = 0; x < width; ++x) {
      const bool right = x >= width / 2;
      const bool bottom = y >= height / 2;
      cv::Vec3b bgr;
      if (!right && !bottom) bgr = {0, 0, 220};    // red
      if (right && !bottom) bgr = {0, 220, 0};     // green
      if (!right && bottom) bgr = {220, 0, 0};     // blue
      if (right && bottom) bgr = {220, 220, 220};  // white
      img.at<cv::Vec3b>(y, x) = bgr;
    }
  }
  return img;
}

// Inserts an APP1 EXIF segment with the given orientation right after SOI.
std::string WithExifOrientation(const std::string& jpeg, int orientation) {
  // TIFF header (little-endian), one IFD entry: 0x0112 SHORT 1 <orientation>.
  const std::string tiff =
      std::string("II*\0\x08\0\0\0", 8) + std::string("\x01\0", 2) +
      std::string("\x12\x01\x03\0\x01\0\0\0", 8) +
      std::string(1, static_cast<char>(orientation)) +
      std::string("\0\0\0", 3) + std::string("\0\0\0\0", 4);
  const std::string payload = std::string("Exif\0\0", 6) + tiff;
  const size_t length = payload.size() + 2;
  std::string segment = "\xFF\xE1";
  segment += static_cast<char>(length >> 8);
  segment += static_cast<char>(length & 0xFF);
  segment += payload;
  return jpeg.substr(0, 2) + segment + jpeg.substr(2);
}

uint32_t Crc32(const std::string& data) {
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char c : data) {
    crc ^= c;
    for (int k = 0; k < 8; ++k)
      crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1)));
  }
  return ~crc;
}

std::string Be32(uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16),
          static_cast<char>(v >> 8), static_cast<char>(v)};
}

// A valid-looking PNG of a few dozen bytes whose header declares
// width x height: a decompression bomb's calling card.
std::string PngDeclaring(uint32_t width, uint32_t height) {
  std::string ihdr = "IHDR" + Be32(width) + Be32(height) +
                     std::string("\x08\x02\x00\x00\x00", 5);
  std::string png = "\x89PNG\r\n\x1a\n";
  png += Be32(13) + ihdr + Be32(Crc32(ihdr));
  // An IDAT with a tiny zlib stream and IEND, so only the header is wrong.
  const std::string idat =
      std::string("IDAT\x78\x9c\x03\x00\x00\x00\x00\x01", 12);
  png += Be32(8) + idat + Be32(Crc32(idat));
  png += Be32(0) + "IEND" + Be32(Crc32("IEND"));
  return png;
}

TEST(SniffFormatTest, NamesEachSupportedFormat) {
  const cv::Mat img = Quadrants(16, 16);
  EXPECT_EQ(SniffFormat(Encode(img, ".jpg")), Format::kJpeg);
  EXPECT_EQ(SniffFormat(Encode(img, ".png")), Format::kPng);
  EXPECT_EQ(SniffFormat(Encode(img, ".bmp")), Format::kBmp);
  EXPECT_EQ(SniffFormat(Encode(img, ".webp")), Format::kWebp);
  EXPECT_EQ(SniffFormat(""), Format::kUnknown);
  EXPECT_EQ(SniffFormat("GIF89a......"), Format::kUnknown);
  EXPECT_EQ(SniffFormat("\xFF\xD8"), Format::kUnknown);
}

TEST(FormatFromContentTypeTest, MapsMimeTypes) {
  EXPECT_EQ(FormatFromContentType("image/jpeg"), Format::kJpeg);
  EXPECT_EQ(FormatFromContentType("IMAGE/JPEG; charset=binary"), Format::kJpeg);
  EXPECT_EQ(FormatFromContentType("image/png"), Format::kPng);
  EXPECT_EQ(FormatFromContentType("image/webp"), Format::kWebp);
  EXPECT_EQ(FormatFromContentType("image/bmp"), Format::kBmp);
  EXPECT_EQ(FormatFromContentType("image/gif"), Format::kUnknown);
  EXPECT_EQ(FormatFromContentType(""), Format::kUnknown);
}

TEST(CheckContentTypeTest, RefusesATypeThatContradictsTheBytes) {
  const std::string png = Encode(Quadrants(8, 8), ".png");
  EXPECT_TRUE(CheckContentType(png, "").ok());
  EXPECT_TRUE(CheckContentType(png, "image/png").ok());
  const absl::Status wrong = CheckContentType(png, "image/jpeg");
  EXPECT_EQ(wrong.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(wrong.message().find("PNG"), std::string::npos) << wrong;
  EXPECT_EQ(CheckContentType(png, "text/plain").code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ProbeTest, ReadsDimensionsOfEveryFormat) {
  const cv::Mat img = Quadrants(123, 45);
  for (const char* ext : {".jpg", ".png", ".bmp", ".webp"}) {
    auto info = Probe(Encode(img, ext));
    ASSERT_TRUE(info.ok()) << ext << ": " << info.status();
    EXPECT_EQ(info->width, 123) << ext;
    EXPECT_EQ(info->height, 45) << ext;
  }
  auto lossless = Probe(Encode(img, ".webp", {cv::IMWRITE_WEBP_QUALITY, 101}));
  ASSERT_TRUE(lossless.ok()) << lossless.status();
  EXPECT_EQ(lossless->width, 123);
  EXPECT_EQ(lossless->height, 45);
  auto bomb = Probe(PngDeclaring(100000, 100000));
  ASSERT_TRUE(bomb.ok()) << bomb.status();
  EXPECT_EQ(bomb->width, 100000);
}

TEST(DecodeRgbTest, ReturnsRgbOrder) {
  auto rgb = DecodeRgb(Encode(Quadrants(20, 20), ".png"), DecodeLimits{});
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  ASSERT_EQ(rgb->type(), CV_8UC3);
  // Top-left is red: R first.
  EXPECT_EQ(rgb->at<cv::Vec3b>(0, 0), cv::Vec3b(220, 0, 0));
  EXPECT_EQ(rgb->at<cv::Vec3b>(0, 19), cv::Vec3b(0, 220, 0));
}

TEST(DecodeRgbTest, GreyPngBecomesThreeEqualChannels) {
  cv::Mat grey(30, 40, CV_8UC1);
  for (int y = 0; y < grey.rows; ++y)
    for (int x = 0; x < grey.cols; ++x) grey.at<uint8_t>(y, x) = x * 6;
  auto rgb = DecodeRgb(Encode(grey, ".png"), DecodeLimits{});
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  ASSERT_EQ(rgb->type(), CV_8UC3);
  EXPECT_EQ(rgb->at<cv::Vec3b>(5, 10), cv::Vec3b(60, 60, 60));
}

TEST(DecodeRgbTest, RgbaPngDropsAlphaWithoutBlending) {
  cv::Mat bgra(10, 10, CV_8UC4, cv::Scalar(10, 20, 30, 0));  // transparent
  auto rgb = DecodeRgb(Encode(bgra, ".png"), DecodeLimits{});
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  ASSERT_EQ(rgb->type(), CV_8UC3);
  EXPECT_EQ(rgb->at<cv::Vec3b>(3, 3), cv::Vec3b(30, 20, 10));
}

TEST(DecodeRgbTest, SixteenBitPngBecomesEightBit) {
  cv::Mat deep(8, 8, CV_16UC3, cv::Scalar(256 * 10, 256 * 20, 256 * 30));
  auto rgb = DecodeRgb(Encode(deep, ".png"), DecodeLimits{});
  ASSERT_TRUE(rgb.ok()) << rgb.status();
  EXPECT_EQ(rgb->type(), CV_8UC3);
  EXPECT_EQ(rgb->at<cv::Vec3b>(0, 0), cv::Vec3b(30, 20, 10));
}

TEST(DecodeRgbTest, AppliesExifOrientationAtFullAndReducedScale) {
  // Orientation 6: the stored picture is displayed rotated 90 degrees
  // clockwise, so the stored top-left (red) quadrant shows top-right.
  const cv::Mat stored = Quadrants(1024, 512);
  const std::string jpeg = WithExifOrientation(
      Encode(stored, ".jpg", {cv::IMWRITE_JPEG_QUALITY, 95}), 6);
  for (int min_side : {0, 256, 128, 64}) {
    auto rgb = DecodeRgb(jpeg, DecodeLimits{}, min_side);
    ASSERT_TRUE(rgb.ok()) << rgb.status();
    const int expect_w = min_side == 0 ? 512 : 512 / (512 / min_side);
    EXPECT_EQ(rgb->cols, expect_w) << "min_side " << min_side;
    EXPECT_EQ(rgb->rows, expect_w * 2) << "min_side " << min_side;
    const cv::Vec3b top_right =
        rgb->at<cv::Vec3b>(rgb->rows / 8, rgb->cols * 7 / 8);
    const cv::Vec3b top_left = rgb->at<cv::Vec3b>(rgb->rows / 8, rgb->cols / 8);
    EXPECT_GT(top_right[0], 180)
        << "red should be top-right, min_side " << min_side;
    EXPECT_LT(top_right[2], 60);
    EXPECT_GT(top_left[2], 180) << "blue should be top-left";
  }
}

TEST(DecodeRgbTest, ReducedScaleNeverGoesBelowMinSide) {
  const std::string jpeg = Encode(Quadrants(1000, 700), ".jpg");
  struct Case {
    int min_side, expect_w, expect_h;
  };
  for (const Case& c :
       {Case{0, 1000, 700}, Case{256, 500, 350}, Case{176, 500, 350},
        Case{175, 250, 175}, Case{88, 125, 88}, Case{701, 1000, 700}}) {
    auto rgb = DecodeRgb(jpeg, DecodeLimits{}, c.min_side);
    ASSERT_TRUE(rgb.ok()) << rgb.status();
    EXPECT_EQ(rgb->cols, c.expect_w) << "min_side " << c.min_side;
    EXPECT_EQ(rgb->rows, c.expect_h) << "min_side " << c.min_side;
  }
  // Only JPEG decodes at reduced scale; other formats come back whole.
  auto png =
      DecodeRgb(Encode(Quadrants(1000, 700), ".png"), DecodeLimits{}, 88);
  ASSERT_TRUE(png.ok());
  EXPECT_EQ(png->cols, 1000);
}

void ExpectInvalid(absl::string_view bytes, absl::string_view why,
                   const DecodeLimits& limits = DecodeLimits{}) {
  auto rgb = DecodeRgb(bytes, limits);
  EXPECT_EQ(rgb.status().code(), absl::StatusCode::kInvalidArgument)
      << why << ": " << rgb.status();
  std::vector<float> out(TensorSize(ImageNetPreprocessing()));
  EXPECT_EQ(
      DecodeAndPreprocess(bytes, ImageNetPreprocessing(), limits, out.data())
          .code(),
      absl::StatusCode::kInvalidArgument)
      << why;
}

TEST(DecodeRgbTest, RefusesEmptyTruncatedCorruptAndUnknownBytes) {
  ExpectInvalid("", "empty");
  ExpectInvalid("hello, world", "text");
  ExpectInvalid("GIF89a\x01\x00\x01\x00\x00\x00\x00", "gif");
  const cv::Mat img = Quadrants(64, 48);
  for (const char* ext : {".jpg", ".png", ".bmp", ".webp"}) {
    const std::string good = Encode(img, ext);
    ASSERT_TRUE(DecodeRgb(good, DecodeLimits{}).ok()) << ext;
    ExpectInvalid(good.substr(0, good.size() / 2),
                  std::string(ext) + " cut in half");
    ExpectInvalid(good.substr(0, 12), std::string(ext) + " header only");
    ExpectInvalid(good.substr(0, 3), std::string(ext) + " magic only");
  }
  // A JPEG whose entropy data is overwritten with noise.
  std::string jpeg = Encode(Quadrants(64, 48), ".jpg");
  const size_t cut = jpeg.size() - 40;
  std::string noisy =
      jpeg.substr(0, 200) + std::string(cut - 200, '\xFF') + jpeg.substr(cut);
  auto decoded = DecodeRgb(noisy, DecodeLimits{});
  // libjpeg may recover garbage pixels or fail; either is fine, a crash is not.
  if (!decoded.ok()) {
    EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(DecodeRgbTest, RefusesHugeDeclaredDimensionsBeforeDecoding) {
  const std::string bomb = PngDeclaring(100000, 100000);
  EXPECT_LT(bomb.size(), 100u);
  auto rgb = DecodeRgb(bomb, DecodeLimits{});
  ASSERT_EQ(rgb.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(rgb.status().message().find("100000x100000"), std::string::npos)
      << rgb.status();
  // The same through a JPEG whose frame header is rewritten.
  std::string jpeg = Encode(Quadrants(64, 48), ".jpg");
  const size_t sof = jpeg.find("\xFF\xC0");
  ASSERT_NE(sof, std::string::npos);
  jpeg[sof + 5] = '\xFF';
  jpeg[sof + 6] = '\xF0';
  jpeg[sof + 7] = '\xFF';
  jpeg[sof + 8] = '\xF0';
  EXPECT_EQ(DecodeRgb(jpeg, DecodeLimits{}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // And a limit the caller sets.
  DecodeLimits small;
  small.max_pixels = 1000;
  ExpectInvalid(Encode(Quadrants(64, 48), ".png"), "over max_pixels", small);
  DecodeLimits tiny_bytes;
  tiny_bytes.max_bytes = 10;
  ExpectInvalid(Encode(Quadrants(64, 48), ".png"), "over max_bytes",
                tiny_bytes);
}

TEST(DecodeRgbTest, AcceptsBytesAfterTheJpegEnd) {
  const std::string jpeg = Encode(Quadrants(64, 48), ".jpg") + "trailing data";
  EXPECT_TRUE(DecodeRgb(jpeg, DecodeLimits{}).ok());
}

TEST(ValidatePreprocessingTest, RefusesUnusableSpecs) {
  EXPECT_TRUE(ValidatePreprocessing(ImageNetPreprocessing()).ok());
  Preprocessing spec = ImageNetPreprocessing();
  spec.set_input_size(0);
  EXPECT_FALSE(ValidatePreprocessing(spec).ok());
  spec = ImageNetPreprocessing();
  spec.set_input_size(5000);
  EXPECT_FALSE(ValidatePreprocessing(spec).ok());
  spec = ImageNetPreprocessing();
  spec.add_mean(0.1f);
  EXPECT_FALSE(ValidatePreprocessing(spec).ok());
  spec = ImageNetPreprocessing();
  spec.set_std(1, 0.0f);
  EXPECT_FALSE(ValidatePreprocessing(spec).ok());
  spec = ImageNetPreprocessing();
  spec.set_resize(200);
  EXPECT_FALSE(ValidatePreprocessing(spec).ok());
  spec.set_resize_mode(kennel::v1::RESIZE_MODE_STRETCH);
  EXPECT_TRUE(ValidatePreprocessing(spec).ok());
  spec = ImageNetPreprocessing();
  spec.clear_mean();
  spec.clear_std();
  EXPECT_TRUE(ValidatePreprocessing(spec).ok());
}

TEST(PreprocessTest, ImageNetSpecAndSizes) {
  const Preprocessing spec = ImageNetPreprocessing();
  EXPECT_EQ(spec.input_size(), 224);
  EXPECT_EQ(spec.resize(), 256);
  EXPECT_EQ(TensorSize(spec), 3 * 224 * 224);
  EXPECT_EQ(MinDecodeSide(spec), 256);
  Preprocessing stretch = spec;
  stretch.set_resize_mode(kennel::v1::RESIZE_MODE_STRETCH);
  EXPECT_EQ(MinDecodeSide(stretch), 224);
}

TEST(PreprocessTest, UniformImageNormalisesToKnownValues) {
  cv::Mat rgb(300, 400, CV_8UC3, cv::Scalar(255, 0, 128));
  const Preprocessing spec = ImageNetPreprocessing();
  std::vector<float> out(TensorSize(spec));
  ASSERT_TRUE(Preprocess(rgb, spec, out.data()).ok());
  const size_t plane = 224 * 224;
  EXPECT_NEAR(out[0], (1.0f - 0.485f) / 0.229f, 1e-6);
  EXPECT_NEAR(out[plane + 100], (0.0f - 0.456f) / 0.224f, 1e-6);
  EXPECT_NEAR(out[2 * plane + 999], (128 / 255.0f - 0.406f) / 0.225f, 1e-6);
}

TEST(PreprocessTest, BgrOrderSwapsPlanesAndMeans) {
  const cv::Mat rgb = [] {
    cv::Mat bgr = Quadrants(320, 240);
    cv::Mat out;
    cv::cvtColor(bgr, out, cv::COLOR_BGR2RGB);
    return out;
  }();
  Preprocessing spec = ImageNetPreprocessing();
  spec.clear_mean();
  spec.clear_std();
  Preprocessing bgr_spec = spec;
  bgr_spec.set_color_order(kennel::v1::COLOR_ORDER_BGR);
  std::vector<float> a(TensorSize(spec)), b(TensorSize(spec));
  ASSERT_TRUE(Preprocess(rgb, spec, a.data()).ok());
  ASSERT_TRUE(Preprocess(rgb, bgr_spec, b.data()).ok());
  const size_t plane = 224 * 224;
  for (size_t i = 0; i < plane; i += 97) {
    EXPECT_EQ(a[i], b[2 * plane + i]);
    EXPECT_EQ(a[plane + i], b[plane + i]);
    EXPECT_EQ(a[2 * plane + i], b[i]);
  }
}

TEST(PreprocessTest, RefusesWrongPixelType) {
  cv::Mat grey(50, 50, CV_8UC1, cv::Scalar(1));
  std::vector<float> out(TensorSize(ImageNetPreprocessing()));
  EXPECT_EQ(Preprocess(grey, ImageNetPreprocessing(), out.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Preprocess(cv::Mat(), ImageNetPreprocessing(), out.data()).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(PreprocessTest, ExtremeAspectRatiosDoNotCrash) {
  std::vector<float> out(TensorSize(ImageNetPreprocessing()));
  for (const auto& [w, h] : {std::pair{1, 1}, std::pair{1, 5000},
                             std::pair{5000, 1}, std::pair{2, 3}}) {
    cv::Mat rgb(h, w, CV_8UC3, cv::Scalar(10, 200, 30));
    const absl::Status s = Preprocess(rgb, ImageNetPreprocessing(), out.data());
    EXPECT_TRUE(s.ok()) << w << "x" << h << ": " << s;
    Preprocessing stretch = ImageNetPreprocessing();
    stretch.set_resize_mode(kennel::v1::RESIZE_MODE_STRETCH);
    EXPECT_TRUE(Preprocess(rgb, stretch, out.data()).ok());
  }
}

TEST(PreprocessAugmentedTest, DeterministicPerGeneratorState) {
  cv::Mat bgr = Quadrants(400, 300);
  cv::Mat rgb;
  cv::cvtColor(bgr, rgb, cv::COLOR_BGR2RGB);
  const Preprocessing spec = ImageNetPreprocessing();
  const size_t n = TensorSize(spec);
  std::vector<float> a(n), b(n), c(n);
  std::mt19937_64 r1(7), r2(7), r3(8);
  ASSERT_TRUE(PreprocessAugmented(rgb, spec, r1, a.data()).ok());
  ASSERT_TRUE(PreprocessAugmented(rgb, spec, r2, b.data()).ok());
  EXPECT_EQ(a, b);
  // Across many draws the crops differ and both flips happen.
  int differing = 0;
  int red_left = 0, red_right = 0;
  for (int i = 0; i < 40; ++i) {
    ASSERT_TRUE(PreprocessAugmented(rgb, spec, r3, c.data()).ok());
    if (c != a) ++differing;
    // Red channel high on row 0: red quadrant is visible at the top.
    const float left = c[0];
    const float right = c[223];
    if (left > 1.5f && right < 0.f) ++red_left;
    if (right > 1.5f && left < 0.f) ++red_right;
  }
  EXPECT_GT(differing, 35);
  EXPECT_GT(red_left, 0);
  EXPECT_GT(red_right, 0) << "no flipped crop showed red on the right";
}

TEST(PreprocessAugmentedTest, StaysFiniteOnTinyImages) {
  const Preprocessing spec = ImageNetPreprocessing();
  std::vector<float> out(TensorSize(spec));
  std::mt19937_64 rng(1);
  for (const auto& [w, h] :
       {std::pair{1, 1}, std::pair{3, 100}, std::pair{100, 3}}) {
    cv::Mat rgb(h, w, CV_8UC3, cv::Scalar(1, 2, 3));
    for (int i = 0; i < 20; ++i) {
      ASSERT_TRUE(PreprocessAugmented(rgb, spec, rng, out.data()).ok());
      for (float v : out) ASSERT_TRUE(std::isfinite(v));
    }
  }
}

TEST(SyntheticImageTest, SameSeedSamePixels) {
  const cv::Mat a = SyntheticImage(64, 48, 3);
  const cv::Mat b = SyntheticImage(64, 48, 3);
  const cv::Mat c = SyntheticImage(64, 48, 4);
  ASSERT_EQ(a.type(), CV_8UC3);
  EXPECT_EQ(a.cols, 64);
  EXPECT_EQ(a.rows, 48);
  EXPECT_EQ(cv::norm(a, b, cv::NORM_INF), 0);
  EXPECT_GT(cv::norm(a, c, cv::NORM_L1), 0);
}

// Compares with tensors torchvision computes, in Python, for the same files.
class TorchvisionReferenceTest : public ::testing::Test {
 protected:
  struct Entry {
    std::string name, file;
    bool exif = false;
  };

  static void SetUpTestSuite() {
    if (access(KENNEL_PYTHON, X_OK) != 0) return;
    char tmpl[] = "/tmp/kennel_image_test_XXXXXX";
    if (mkdtemp(tmpl) == nullptr) return;
    dir_ = new std::string(tmpl);
    const std::string cmd = std::string(KENNEL_PYTHON) + " " +
                            KENNEL_IMAGE_TESTDATA + "/make_images.py " + *dir_;
    generated_ = std::system(cmd.c_str()) == 0;
  }
  static void TearDownTestSuite() {
    if (dir_ != nullptr) {
      std::system(("rm -rf " + *dir_).c_str());
      delete dir_;
      dir_ = nullptr;
    }
  }

  void SetUp() override {
    if (dir_ == nullptr) GTEST_SKIP() << KENNEL_PYTHON << " is not available";
    ASSERT_TRUE(generated_) << "make_images.py failed";
    std::ifstream manifest(*dir_ + "/manifest.tsv");
    std::string line;
    while (std::getline(manifest, line)) {
      std::vector<std::string> f = absl::StrSplit(line, '\t');
      ASSERT_EQ(f.size(), 3u) << line;
      entries_.push_back({f[0], f[1], f[2] == "1"});
    }
    ASSERT_GE(entries_.size(), 12u);
  }

  static std::string Read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }

  static std::vector<float> ReadFloats(const std::string& path) {
    const std::string bytes = Read(path);
    std::vector<float> v(bytes.size() / sizeof(float));
    std::memcpy(v.data(), bytes.data(), v.size() * sizeof(float));
    return v;
  }

  struct Diff {
    double max_abs = 0, mean_abs = 0;
  };
  static Diff Compare(const std::vector<float>& a,
                      const std::vector<float>& b) {
    Diff d;
    EXPECT_EQ(a.size(), b.size());
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) {
      const double e = std::abs(double{a[i]} - b[i]);
      d.max_abs = std::max(d.max_abs, e);
      d.mean_abs += e;
    }
    d.mean_abs /= std::max<size_t>(a.size(), 1);
    return d;
  }

  static inline std::string* dir_ = nullptr;
  static inline bool generated_ = false;
  std::vector<Entry> entries_;
};

// One step of 8-bit rounding after normalisation by the smallest std (0.224):
// 1/255/0.224 = 0.0175. A full-scale decode must agree to within that on
// every value: the resampling replicates Pillow's fixed-point arithmetic and
// both sides decode with the system libjpeg (here the tensors are
// bit-identical).
constexpr double kFullDecodeMaxAbs = 0.0176;

TEST_F(TorchvisionReferenceTest, FullDecodeMatchesResizeCenterCropNormalize) {
  const Preprocessing crop = ImageNetPreprocessing();
  Preprocessing stretch = crop;
  stretch.set_resize_mode(kennel::v1::RESIZE_MODE_STRETCH);
  std::vector<float> out(TensorSize(crop));
  for (const Entry& e : entries_) {
    auto rgb = DecodeRgb(Read(*dir_ + "/" + e.file), DecodeLimits{}, 0);
    ASSERT_TRUE(rgb.ok()) << e.name << ": " << rgb.status();
    for (const auto& [name, spec] :
         {std::pair{"crop", &crop},
          std::pair{"stretch", &std::as_const(stretch)}}) {
      ASSERT_TRUE(Preprocess(*rgb, *spec, out.data()).ok());
      const Diff d =
          Compare(out, ReadFloats(*dir_ + "/" + e.name + "." + name + ".f32"));
      EXPECT_LE(d.max_abs, kFullDecodeMaxAbs) << e.name << " " << name;
      EXPECT_LE(d.mean_abs, 1e-4) << e.name << " " << name;
    }
  }
}

// Decoding a large JPEG at 1/2 or 1/4 scale averages inside the IDCT instead
// of in the resampler, which moves individual values by a few 8-bit steps
// but keeps the picture: measured here at mean 0.006-0.011 and max 0.10-0.22
// (0.01 is under one 8-bit step).
TEST_F(TorchvisionReferenceTest, ReducedScaleDecodeStaysClose) {
  const Preprocessing spec = ImageNetPreprocessing();
  std::vector<float> out(TensorSize(spec));
  int reduced = 0;
  for (const Entry& e : entries_) {
    const std::string bytes = Read(*dir_ + "/" + e.file);
    auto info = Probe(bytes);
    ASSERT_TRUE(info.ok());
    if (info->format == Format::kJpeg &&
        std::min(info->width, info->height) >= 2 * MinDecodeSide(spec)) {
      ++reduced;
    }
    ASSERT_TRUE(
        DecodeAndPreprocess(bytes, spec, DecodeLimits{}, out.data()).ok())
        << e.name;
    const Diff d = Compare(out, ReadFloats(*dir_ + "/" + e.name + ".crop.f32"));
    EXPECT_LE(d.mean_abs, 0.02) << e.name;
    EXPECT_LE(d.max_abs, 0.4) << e.name;
  }
  EXPECT_GE(reduced, 3) << "the set should hold large JPEGs";
}

TEST_F(TorchvisionReferenceTest, DecodeAndPreprocessEqualsTheTwoSteps) {
  // The one-call path (which skips the BGR->RGB conversion) gives the same
  // tensor as DecodeRgb + Preprocess with the same reduction.
  const Preprocessing spec = ImageNetPreprocessing();
  std::vector<float> a(TensorSize(spec)), b(TensorSize(spec));
  for (const Entry& e : entries_) {
    const std::string bytes = Read(*dir_ + "/" + e.file);
    ASSERT_TRUE(
        DecodeAndPreprocess(bytes, spec, DecodeLimits{}, a.data()).ok());
    auto rgb = DecodeRgb(bytes, DecodeLimits{}, MinDecodeSide(spec));
    ASSERT_TRUE(rgb.ok());
    ASSERT_TRUE(Preprocess(*rgb, spec, b.data()).ok());
    EXPECT_EQ(a, b) << e.name;
  }
}

}  // namespace
}  // namespace kennel::image
