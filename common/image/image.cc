#include "common/image/image.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <exception>
#include <limits>
#include <opencv2/core.hpp>
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/preprocessing.h"
#include "common/status.h"

namespace kennel::image {
namespace {

uint32_t Be16(const unsigned char* p) { return (uint32_t{p[0]} << 8) | p[1]; }
uint32_t Be32(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) |
         (uint32_t{p[2]} << 8) | p[3];
}
uint32_t Le16(const unsigned char* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8);
}
uint32_t Le24(const unsigned char* p) {
  return uint32_t{p[0]} | (uint32_t{p[1]} << 8) | (uint32_t{p[2]} << 16);
}
uint32_t Le32(const unsigned char* p) {
  return Le24(p) | (uint32_t{p[3]} << 24);
}

absl::Status Bad(absl::string_view what) {
  return absl::InvalidArgumentError(std::string(what));
}

// The header fields Probe reads, plus where a JPEG's first scan starts (the
// truncation check needs it).
struct Header {
  ImageInfo info;
  size_t jpeg_scan_offset = 0;
};

bool IsJpegSof(int marker) {
  // SOF0..SOF15, except DHT (C4), JPG (C8) and DAC (CC), which share the range.
  return marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 &&
         marker != 0xCC;
}

absl::StatusOr<Header> ProbeJpeg(absl::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  Header header;
  header.info.format = Format::kJpeg;
  bool have_size = false;
  size_t i = 2;  // after SOI
  while (i < n) {
    if (p[i] != 0xFF) return Bad("corrupt JPEG: expected a marker");
    // Any number of 0xFF fill bytes may precede a marker.
    while (i < n && p[i] == 0xFF) ++i;
    if (i >= n) break;
    const int marker = p[i++];
    if (marker == 0xD8 || marker == 0x01 ||
        (marker >= 0xD0 && marker <= 0xD7)) {
      continue;  // markers without a length
    }
    if (marker == 0xD9) return Bad("corrupt JPEG: image ends before any scan");
    if (i + 2 > n) break;
    const uint32_t length = Be16(p + i);
    if (length < 2) return Bad("corrupt JPEG: bad segment length");
    if (IsJpegSof(marker)) {
      if (i + 7 > n) break;
      header.info.height = static_cast<int>(Be16(p + i + 3));
      header.info.width = static_cast<int>(Be16(p + i + 5));
      have_size = true;
    } else if (marker == 0xDA) {
      if (!have_size) return Bad("corrupt JPEG: scan before the frame header");
      header.jpeg_scan_offset = i + length;
      if (header.jpeg_scan_offset > n) break;
      if (header.info.width == 0 || header.info.height == 0) {
        return Bad(
            "unsupported JPEG: zero width or height in the frame header");
      }
      return header;
    }
    i += length;
  }
  return Bad("truncated JPEG: the data ends inside the headers");
}

absl::StatusOr<Header> ProbePng(absl::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  if (bytes.size() < 24 || std::memcmp(p + 12, "IHDR", 4) != 0) {
    return Bad("truncated or corrupt PNG: no IHDR chunk");
  }
  const uint32_t width = Be32(p + 16);
  const uint32_t height = Be32(p + 20);
  if (width == 0 || height == 0 || width > 0x7FFFFFFF || height > 0x7FFFFFFF) {
    return Bad("corrupt PNG: invalid width or height");
  }
  Header header;
  header.info = {Format::kPng, static_cast<int>(width),
                 static_cast<int>(height)};
  return header;
}

absl::StatusOr<Header> ProbeWebp(absl::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  if (n < 30) return Bad("truncated WebP: header incomplete");
  Header header;
  header.info.format = Format::kWebp;
  if (std::memcmp(p + 12, "VP8 ", 4) == 0) {
    if (p[23] != 0x9D || p[24] != 0x01 || p[25] != 0x2A) {
      return Bad("corrupt WebP: bad VP8 start code");
    }
    header.info.width = static_cast<int>(Le16(p + 26) & 0x3FFF);
    header.info.height = static_cast<int>(Le16(p + 28) & 0x3FFF);
  } else if (std::memcmp(p + 12, "VP8L", 4) == 0) {
    if (p[20] != 0x2F) return Bad("corrupt WebP: bad VP8L signature");
    const uint32_t bits = Le32(p + 21);
    header.info.width = static_cast<int>((bits & 0x3FFF) + 1);
    header.info.height = static_cast<int>(((bits >> 14) & 0x3FFF) + 1);
  } else if (std::memcmp(p + 12, "VP8X", 4) == 0) {
    header.info.width = static_cast<int>(Le24(p + 24) + 1);
    header.info.height = static_cast<int>(Le24(p + 27) + 1);
  } else {
    return Bad("unsupported WebP: unknown first chunk");
  }
  if (header.info.width == 0 || header.info.height == 0) {
    return Bad("corrupt WebP: zero width or height");
  }
  return header;
}

absl::StatusOr<Header> ProbeBmp(absl::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  if (n < 26) return Bad("truncated BMP: header incomplete");
  const uint32_t dib_size = Le32(p + 14);
  int64_t width = 0;
  int64_t height = 0;
  if (dib_size == 12) {
    width = Le16(p + 18);
    height = Le16(p + 20);
  } else if (dib_size >= 40) {
    // Negative height means rows stored top-down.
    width = static_cast<int32_t>(Le32(p + 18));
    height = static_cast<int32_t>(Le32(p + 22));
    if (height < 0) height = -height;
  } else {
    return Bad("unsupported BMP: unknown header size");
  }
  if (width <= 0 || height <= 0 || width > 0x7FFFFFFF || height > 0x7FFFFFFF) {
    return Bad("corrupt BMP: invalid width or height");
  }
  Header header;
  header.info = {Format::kBmp, static_cast<int>(width),
                 static_cast<int>(height)};
  return header;
}

absl::StatusOr<Header> ProbeHeader(absl::string_view bytes) {
  if (bytes.empty()) return Bad("empty image: no bytes were sent");
  switch (SniffFormat(bytes)) {
    case Format::kJpeg:
      return ProbeJpeg(bytes);
    case Format::kPng:
      return ProbePng(bytes);
    case Format::kWebp:
      return ProbeWebp(bytes);
    case Format::kBmp:
      return ProbeBmp(bytes);
    case Format::kUnknown:
      break;
  }
  return Bad(
      "unsupported image format: the bytes are not JPEG, PNG, WebP or BMP");
}

// libjpeg decodes a truncated file without failing, padding the missing rows
// with grey. The entropy-coded data can never contain FF D9 (a literal FF is
// stuffed as FF 00), so a complete file has an EOI marker after its first
// scan; an EXIF thumbnail's EOI sits before it and does not count. Bytes
// after the EOI are allowed (some cameras append data).
bool JpegHasEndAfterScan(absl::string_view bytes, size_t scan_offset) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  for (size_t i = bytes.size(); i >= scan_offset + 2; --i) {
    if (p[i - 2] == 0xFF && p[i - 1] == 0xD9) return true;
  }
  return false;
}

// Output of the decoder: 8-bit 3-channel pixels, in OpenCV's BGR order unless
// converted.
absl::StatusOr<cv::Mat> DecodeBgr(absl::string_view bytes,
                                  const DecodeLimits& limits, int min_side) {
  if (bytes.empty()) return Bad("empty image: no bytes were sent");
  if (static_cast<int64_t>(bytes.size()) > limits.max_bytes) {
    return Bad(absl::StrCat("image is ", bytes.size(),
                            " bytes, more than the limit of ",
                            limits.max_bytes));
  }
  ASSIGN_OR_RETURN(Header header, ProbeHeader(bytes));
  const ImageInfo& info = header.info;
  const int64_t pixels = int64_t{info.width} * info.height;
  if (pixels > limits.max_pixels) {
    return Bad(absl::StrCat(FormatName(info.format), " image declares ",
                            info.width, "x", info.height, " = ", pixels,
                            " pixels, more than the limit of ",
                            limits.max_pixels));
  }
  int flags = cv::IMREAD_COLOR;
  if (info.format == Format::kJpeg) {
    if (!JpegHasEndAfterScan(bytes, header.jpeg_scan_offset)) {
      return Bad("truncated JPEG: no end-of-image marker after the scan data");
    }
    if (min_side > 0) {
      // libjpeg scales by 1/2, 1/4 or 1/8 inside the IDCT, rounding up.
      const int shorter = std::min(info.width, info.height);
      for (const auto& [denom, mode] :
           {std::pair{8, cv::IMREAD_REDUCED_COLOR_8},
            std::pair{4, cv::IMREAD_REDUCED_COLOR_4},
            std::pair{2, cv::IMREAD_REDUCED_COLOR_2}}) {
        if ((shorter + denom - 1) / denom >= min_side) {
          flags = mode;
          break;
        }
      }
    }
  }
  cv::Mat mat;
  try {
    // imdecode copies nothing when given a Mat header over the bytes.
    const cv::Mat buffer(1, static_cast<int>(bytes.size()), CV_8UC1,
                         const_cast<char*>(bytes.data()));
    mat = cv::imdecode(buffer, flags);
  } catch (const cv::Exception& e) {
    return Bad(absl::StrCat("corrupt ", FormatName(info.format),
                            " image: ", e.what()));
  } catch (const std::exception& e) {
    return Bad(absl::StrCat("corrupt ", FormatName(info.format),
                            " image: ", e.what()));
  }
  if (mat.empty()) {
    return Bad(absl::StrCat("corrupt or truncated ", FormatName(info.format),
                            " image: the decoder could not read it"));
  }
  if (mat.type() != CV_8UC3) {
    return absl::InternalError(absl::StrCat("decoder returned pixel type ",
                                            mat.type(),
                                            " instead of 8-bit colour"));
  }
  // The header may understate what the decoder produced (a second frame
  // header, say); never hand out more than the limit allows.
  if (static_cast<int64_t>(mat.total()) > limits.max_pixels) {
    return Bad("image decodes to more pixels than the limit");
  }
  return mat;
}

// Resampling weights for one axis, computed exactly as Pillow's
// precompute_coeffs + normalize_coeffs_8bpc do for its BILINEAR filter, which
// is what torchvision's Resize applies to PIL images. Pillow scales the filter
// support with the reduction factor (an antialiased triangle), which is why
// neither cv::INTER_LINEAR nor cv::INTER_AREA reproduces it. Fixed-point
// weights with Pillow's 22 fractional bits give the same bytes Pillow gives.
constexpr int kPrecisionBits = 32 - 8 - 2;

struct AxisWeights {
  int taps = 0;
  // Per output position (of those requested): first source index and count.
  std::vector<int> first;
  std::vector<int> count;
  // taps weights per output position.
  std::vector<int32_t> weights;
};

double BilinearFilter(double x) {
  if (x < 0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Weights for output positions [out_begin, out_begin + out_count) of a
// resize from in_size to out_size.
AxisWeights ComputeAxisWeights(int in_size, int64_t out_size, int64_t out_begin,
                               int out_count) {
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;
  AxisWeights w;
  w.taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  w.first.resize(out_count);
  w.count.resize(out_count);
  w.weights.assign(static_cast<size_t>(out_count) * w.taps, 0);
  std::vector<double> k(w.taps);
  for (int o = 0; o < out_count; ++o) {
    const int64_t xx = out_begin + o;
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    xmax = std::min(xmax, w.taps);
    double total = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = BilinearFilter((x + xmin - center + 0.5) * ss);
      total += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = total != 0.0 ? k[x] / total : k[x];
      w.weights[static_cast<size_t>(o) * w.taps + x] =
          static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecisionBits)
                                     : 0.5 + v * (1 << kPrecisionBits));
    }
    w.first[o] = xmin;
    w.count[o] = std::max(xmax, 0);
  }
  return w;
}

inline uint8_t Clip8(int32_t v) {
  if (v >= (int32_t{1} << kPrecisionBits << 8)) return 255;
  if (v <= 0) return 0;
  return static_cast<uint8_t>(v >> kPrecisionBits);
}

// Per-channel lookup from a byte to its normalised value, computed as
// torchvision does it ((v / 255 - mean) / std in float32), so the result
// matches ToTensor + Normalize bit for bit.
using Lut = std::array<std::array<float, 256>, 3>;

Lut MakeLut(const kennel::v1::Preprocessing& spec) {
  Lut lut;
  for (int c = 0; c < 3; ++c) {
    const float mean = spec.mean_size() == 3 ? spec.mean(c) : 0.0f;
    const float sd = spec.std_size() == 3 ? spec.std(c) : 1.0f;
    for (int v = 0; v < 256; ++v) {
      lut[c][v] = (static_cast<float>(v) / 255.0f - mean) / sd;
    }
  }
  return lut;
}

// A rectangle: x, y, width, height.
struct Rect {
  int64_t x = 0, y = 0, w = 0, h = 0;
};

// Resizes the `region` of `image` (8-bit, 3 channels; `bgr` says the channel
// order) to resized_w x resized_h with Pillow's bilinear filter, keeps the
// `crop` of that result, optionally mirrors it, and writes it normalised as
// CHW floats in spec.color_order. Only the output pixels inside the crop are
// computed; each depends only on its own weights, so the values are those of
// a full resize followed by a crop.
absl::Status ResizeCropNormalize(const cv::Mat& image, bool bgr, Rect region,
                                 int64_t resized_w, int64_t resized_h,
                                 Rect crop, bool flip,
                                 const kennel::v1::Preprocessing& spec,
                                 float* out) {
  if (image.empty() || image.type() != CV_8UC3) {
    return Bad("image must be 8-bit with 3 channels");
  }
  if (region.w <= 0 || region.h <= 0 || region.x < 0 || region.y < 0 ||
      region.x + region.w > image.cols || region.y + region.h > image.rows) {
    return absl::InternalError("resize region outside the image");
  }
  if (crop.x < 0 || crop.y < 0 || crop.x + crop.w > resized_w ||
      crop.y + crop.h > resized_h || crop.w <= 0 || crop.h <= 0) {
    return absl::InternalError("crop outside the resized image");
  }
  const int cw = static_cast<int>(crop.w);
  const int ch = static_cast<int>(crop.h);
  const bool need_h = resized_w != region.w;
  const bool need_v = resized_h != region.h;

  // Which source channel feeds output channel c.
  const bool want_bgr = spec.color_order() == kennel::v1::COLOR_ORDER_BGR;
  int src_channel[3];
  for (int c = 0; c < 3; ++c) src_channel[c] = (bgr == want_bgr) ? c : 2 - c;
  const Lut lut = MakeLut(spec);

  // Vertical weights first: they say which source rows the horizontal pass
  // must produce.
  AxisWeights vw;
  int row_begin = static_cast<int>(region.y + crop.y);
  int row_end = row_begin + ch;
  if (need_v) {
    vw = ComputeAxisWeights(static_cast<int>(region.h), resized_h, crop.y, ch);
    row_begin = static_cast<int>(region.y) + vw.first.front();
    row_end = static_cast<int>(region.y) + vw.first.back() + vw.count.back();
    for (int o = 0; o < ch; ++o) {
      row_end = std::max(
          row_end, static_cast<int>(region.y) + vw.first[o] + vw.count[o]);
    }
  }

  // Horizontal pass into an 8-bit buffer, as Pillow does (it rounds between
  // the passes).
  const int rows = row_end - row_begin;
  std::vector<uint8_t> tmp(static_cast<size_t>(rows) * cw * 3);
  if (need_h) {
    const AxisWeights hw =
        ComputeAxisWeights(static_cast<int>(region.w), resized_w, crop.x, cw);
    for (int r = 0; r < rows; ++r) {
      const uint8_t* src = image.ptr<uint8_t>(row_begin + r) + region.x * 3;
      uint8_t* dst = tmp.data() + static_cast<size_t>(r) * cw * 3;
      for (int o = 0; o < cw; ++o) {
        const int32_t* k = hw.weights.data() + static_cast<size_t>(o) * hw.taps;
        const uint8_t* s = src + hw.first[o] * 3;
        int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;
        for (int t = 0; t < hw.count[o]; ++t) {
          s0 += s[t * 3 + 0] * k[t];
          s1 += s[t * 3 + 1] * k[t];
          s2 += s[t * 3 + 2] * k[t];
        }
        dst[o * 3 + 0] = Clip8(s0);
        dst[o * 3 + 1] = Clip8(s1);
        dst[o * 3 + 2] = Clip8(s2);
      }
    }
  } else {
    for (int r = 0; r < rows; ++r) {
      const uint8_t* src =
          image.ptr<uint8_t>(row_begin + r) + (region.x + crop.x) * 3;
      std::memcpy(tmp.data() + static_cast<size_t>(r) * cw * 3, src,
                  static_cast<size_t>(cw) * 3);
    }
  }

  // Vertical pass, straight into the normalised CHW planes.
  const size_t plane = static_cast<size_t>(cw) * ch;
  std::vector<int32_t> acc(static_cast<size_t>(cw) * 3);
  std::vector<uint8_t> row(static_cast<size_t>(cw) * 3);
  for (int y = 0; y < ch; ++y) {
    const uint8_t* line;
    if (need_v) {
      std::fill(acc.begin(), acc.end(), 1 << (kPrecisionBits - 1));
      const int32_t* k = vw.weights.data() + static_cast<size_t>(y) * vw.taps;
      const int base = static_cast<int>(region.y) + vw.first[y] - row_begin;
      for (int t = 0; t < vw.count[y]; ++t) {
        const uint8_t* s = tmp.data() + static_cast<size_t>(base + t) * cw * 3;
        const int32_t kt = k[t];
        for (size_t i = 0; i < acc.size(); ++i) acc[i] += s[i] * kt;
      }
      for (size_t i = 0; i < acc.size(); ++i) row[i] = Clip8(acc[i]);
      line = row.data();
    } else {
      line = tmp.data() + static_cast<size_t>(y) * cw * 3;
    }
    for (int c = 0; c < 3; ++c) {
      const int sc = src_channel[c];
      const std::array<float, 256>& table = lut[c];
      float* dst = out + c * plane + static_cast<size_t>(y) * cw;
      if (flip) {
        for (int x = 0; x < cw; ++x) dst[cw - 1 - x] = table[line[x * 3 + sc]];
      } else {
        for (int x = 0; x < cw; ++x) dst[x] = table[line[x * 3 + sc]];
      }
    }
  }
  return absl::OkStatus();
}

// Python's round() for the halves that (a - b) / 2 produces: ties go to even.
int64_t HalfDiffRoundedEven(int64_t diff) {
  const int64_t k = diff / 2;
  if (diff % 2 == 0) return k;
  return (k % 2 == 0) ? k : k + 1;
}

absl::Status PreprocessImpl(const cv::Mat& image, bool bgr,
                            const kennel::v1::Preprocessing& spec, float* out) {
  RETURN_IF_ERROR(ValidatePreprocessing(spec));
  if (image.empty() || image.type() != CV_8UC3) {
    return Bad("Preprocess needs an 8-bit image with 3 channels");
  }
  const int64_t w = image.cols;
  const int64_t h = image.rows;
  const int64_t size = spec.input_size();
  Rect region{0, 0, w, h};
  if (spec.resize_mode() == kennel::v1::RESIZE_MODE_STRETCH) {
    return ResizeCropNormalize(image, bgr, region, size, size,
                               Rect{0, 0, size, size}, false, spec, out);
  }
  // torchvision's Resize(int): the shorter side becomes `resize`, the longer
  // int(resize * long / short).
  const int64_t resize = spec.resize() > 0 ? spec.resize() : size;
  const int64_t shorter = std::min(w, h);
  const int64_t longer = std::max(w, h);
  const int64_t new_long = static_cast<int64_t>(static_cast<double>(resize) *
                                                static_cast<double>(longer) /
                                                static_cast<double>(shorter));
  if (new_long > (int64_t{1} << 24)) {
    return Bad(absl::StrCat("image aspect ratio ", w, "x", h,
                            " is too extreme to resize"));
  }
  const int64_t rw = w <= h ? resize : new_long;
  const int64_t rh = w <= h ? new_long : resize;
  // torchvision's CenterCrop: int(round((side - size) / 2.0)).
  const Rect crop{HalfDiffRoundedEven(rw - size),
                  HalfDiffRoundedEven(rh - size), size, size};
  return ResizeCropNormalize(image, bgr, region, rw, rh, crop, false, spec,
                             out);
}

// A double in [0, 1) from 53 bits of the generator, the same on every
// standard library (std::uniform_real_distribution is not).
double Uniform01(std::mt19937_64& rng) {
  return static_cast<double>(rng() >> 11) * (1.0 / 9007199254740992.0);
}

double UniformIn(std::mt19937_64& rng, double lo, double hi) {
  return lo + (hi - lo) * Uniform01(rng);
}

// An integer in [lo, hi] (inclusive).
int64_t UniformInt(std::mt19937_64& rng, int64_t lo, int64_t hi) {
  if (hi <= lo) return lo;
  const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
  return lo + static_cast<int64_t>(rng() % span);
}

}  // namespace

Format SniffFormat(absl::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  if (n >= 3 && p[0] == 0xFF && p[1] == 0xD8 && p[2] == 0xFF) {
    return Format::kJpeg;
  }
  if (n >= 8 && std::memcmp(p, "\x89PNG\r\n\x1a\n", 8) == 0) {
    return Format::kPng;
  }
  if (n >= 12 && std::memcmp(p, "RIFF", 4) == 0 &&
      std::memcmp(p + 8, "WEBP", 4) == 0) {
    return Format::kWebp;
  }
  if (n >= 2 && p[0] == 'B' && p[1] == 'M') return Format::kBmp;
  return Format::kUnknown;
}

absl::string_view FormatName(Format format) {
  switch (format) {
    case Format::kJpeg:
      return "JPEG";
    case Format::kPng:
      return "PNG";
    case Format::kWebp:
      return "WebP";
    case Format::kBmp:
      return "BMP";
    case Format::kUnknown:
      break;
  }
  return "unknown";
}

Format FormatFromContentType(absl::string_view content_type) {
  // Parameters ("; charset=...") and case do not matter.
  const size_t semicolon = content_type.find(';');
  std::string type = absl::AsciiStrToLower(
      absl::StripAsciiWhitespace(content_type.substr(0, semicolon)));
  if (type == "image/jpeg" || type == "image/jpg" || type == "image/pjpeg") {
    return Format::kJpeg;
  }
  if (type == "image/png") return Format::kPng;
  if (type == "image/webp") return Format::kWebp;
  if (type == "image/bmp" || type == "image/x-bmp" ||
      type == "image/x-ms-bmp") {
    return Format::kBmp;
  }
  return Format::kUnknown;
}

absl::Status CheckContentType(absl::string_view bytes,
                              absl::string_view content_type) {
  if (content_type.empty()) return absl::OkStatus();
  const Format declared = FormatFromContentType(content_type);
  if (declared == Format::kUnknown) {
    return Bad(absl::StrCat("unsupported content type \"", content_type,
                            "\"; send image/jpeg, image/png, image/webp or "
                            "image/bmp"));
  }
  const Format actual = SniffFormat(bytes);
  if (actual != Format::kUnknown && actual != declared) {
    return Bad(absl::StrCat("content type \"", content_type,
                            "\" contradicts the bytes, which are ",
                            FormatName(actual)));
  }
  return absl::OkStatus();
}

absl::StatusOr<ImageInfo> Probe(absl::string_view bytes) {
  ASSIGN_OR_RETURN(Header header, ProbeHeader(bytes));
  return header.info;
}

absl::StatusOr<cv::Mat> DecodeRgb(absl::string_view bytes,
                                  const DecodeLimits& limits, int min_side) {
  ASSIGN_OR_RETURN(cv::Mat mat, DecodeBgr(bytes, limits, min_side));
  try {
    cv::cvtColor(mat, mat, cv::COLOR_BGR2RGB);
  } catch (const cv::Exception& e) {
    return absl::InternalError(absl::StrCat("colour conversion: ", e.what()));
  }
  return mat;
}

int MinDecodeSide(const kennel::v1::Preprocessing& spec) {
  if (spec.resize_mode() == kennel::v1::RESIZE_MODE_SHORTER_SIDE_THEN_CROP &&
      spec.resize() > 0) {
    return std::max(spec.resize(), spec.input_size());
  }
  return spec.input_size();
}

int64_t TensorSize(const kennel::v1::Preprocessing& spec) {
  return 3 * int64_t{spec.input_size()} * spec.input_size();
}

absl::Status Preprocess(const cv::Mat& rgb,
                        const kennel::v1::Preprocessing& spec, float* out) {
  return PreprocessImpl(rgb, /*bgr=*/false, spec, out);
}

absl::Status PreprocessAugmented(const cv::Mat& rgb,
                                 const kennel::v1::Preprocessing& spec,
                                 std::mt19937_64& rng, float* out) {
  RETURN_IF_ERROR(ValidatePreprocessing(spec));
  if (rgb.empty() || rgb.type() != CV_8UC3) {
    return Bad("PreprocessAugmented needs an 8-bit image with 3 channels");
  }
  // torchvision's RandomResizedCrop.get_params with scale (0.08, 1) and
  // ratio (3/4, 4/3): ten tries at a random area and aspect, then a centre
  // crop clamped to the ratio range.
  const int64_t width = rgb.cols;
  const int64_t height = rgb.rows;
  const double area = static_cast<double>(width) * height;
  const double log_lo = std::log(3.0 / 4.0);
  const double log_hi = std::log(4.0 / 3.0);
  Rect box;
  bool found = false;
  for (int attempt = 0; attempt < 10 && !found; ++attempt) {
    const double target_area = area * UniformIn(rng, 0.08, 1.0);
    const double aspect = std::exp(UniformIn(rng, log_lo, log_hi));
    const int64_t w = std::llround(std::sqrt(target_area * aspect));
    const int64_t h = std::llround(std::sqrt(target_area / aspect));
    if (w > 0 && w <= width && h > 0 && h <= height) {
      box = {UniformInt(rng, 0, width - w), UniformInt(rng, 0, height - h), w,
             h};
      found = true;
    }
  }
  if (!found) {
    const double in_ratio = static_cast<double>(width) / height;
    int64_t w = width;
    int64_t h = height;
    if (in_ratio < 3.0 / 4.0) {
      h = std::llround(w / (3.0 / 4.0));
    } else if (in_ratio > 4.0 / 3.0) {
      w = std::llround(h * (4.0 / 3.0));
    }
    w = std::clamp<int64_t>(w, 1, width);
    h = std::clamp<int64_t>(h, 1, height);
    box = {(width - w) / 2, (height - h) / 2, w, h};
  }
  const bool flip = Uniform01(rng) < 0.5;
  const int64_t size = spec.input_size();
  return ResizeCropNormalize(rgb, /*bgr=*/false, box, size, size,
                             Rect{0, 0, size, size}, flip, spec, out);
}

absl::Status DecodeAndPreprocess(absl::string_view bytes,
                                 const kennel::v1::Preprocessing& spec,
                                 const DecodeLimits& limits, float* out) {
  RETURN_IF_ERROR(ValidatePreprocessing(spec));
  // The preprocessing reads OpenCV's BGR directly, which saves a conversion.
  ASSIGN_OR_RETURN(cv::Mat bgr, DecodeBgr(bytes, limits, MinDecodeSide(spec)));
  return PreprocessImpl(bgr, /*bgr=*/true, spec, out);
}

cv::Mat SyntheticImage(int width, int height, uint64_t seed) {
  std::mt19937_64 rng(seed);
  width = std::max(width, 1);
  height = std::max(height, 1);
  cv::Mat img(height, width, CV_8UC3);
  // Each channel: a sum of two slanted sinusoids of random frequency.
  double fx[3][2], fy[3][2], phase[3][2];
  for (int c = 0; c < 3; ++c) {
    for (int k = 0; k < 2; ++k) {
      fx[c][k] = UniformIn(rng, 0.5, 4.0) * 2 * M_PI / width;
      fy[c][k] = UniformIn(rng, 0.5, 4.0) * 2 * M_PI / height;
      phase[c][k] = UniformIn(rng, 0, 2 * M_PI);
    }
  }
  for (int y = 0; y < height; ++y) {
    auto* row = img.ptr<cv::Vec3b>(y);
    for (int x = 0; x < width; ++x) {
      for (int c = 0; c < 3; ++c) {
        const double v = std::sin(fx[c][0] * x + fy[c][0] * y + phase[c][0]) +
                         std::sin(fx[c][1] * x + fy[c][1] * y + phase[c][1]);
        row[x][c] = cv::saturate_cast<uint8_t>(128 + 50 * v);
      }
    }
  }
  for (int i = 0; i < 10; ++i) {
    const cv::Scalar colour(static_cast<double>(UniformInt(rng, 0, 255)),
                            static_cast<double>(UniformInt(rng, 0, 255)),
                            static_cast<double>(UniformInt(rng, 0, 255)));
    const cv::Point a(static_cast<int>(UniformInt(rng, 0, width - 1)),
                      static_cast<int>(UniformInt(rng, 0, height - 1)));
    const cv::Point b(static_cast<int>(UniformInt(rng, 0, width - 1)),
                      static_cast<int>(UniformInt(rng, 0, height - 1)));
    if (i % 2 == 0) {
      const int radius = std::max(1, std::abs(a.x - b.x) / 2);
      cv::circle(img, a, radius, colour, cv::FILLED, cv::LINE_AA);
    } else {
      cv::rectangle(img, a, b, colour, cv::FILLED, cv::LINE_AA);
    }
  }
  cv::GaussianBlur(img, img, cv::Size(0, 0), 1.2);
  // Sensor-like noise (cv::randu would draw from OpenCV's shared state).
  for (int y = 0; y < height; ++y) {
    uint8_t* row = img.ptr<uint8_t>(y);
    for (int i = 0; i < width * 3; ++i) {
      row[i] =
          cv::saturate_cast<uint8_t>(row[i] + static_cast<int>(rng() % 13) - 6);
    }
  }
  return img;
}

kennel::v1::Preprocessing ImageNetPreprocessing() {
  kennel::v1::Preprocessing spec;
  spec.set_input_size(224);
  spec.set_resize_mode(kennel::v1::RESIZE_MODE_SHORTER_SIDE_THEN_CROP);
  spec.set_resize(256);
  for (float m : {0.485f, 0.456f, 0.406f}) spec.add_mean(m);
  for (float s : {0.229f, 0.224f, 0.225f}) spec.add_std(s);
  spec.set_color_order(kennel::v1::COLOR_ORDER_RGB);
  return spec;
}

absl::Status ValidatePreprocessing(const kennel::v1::Preprocessing& spec) {
  return preprocessing::Validate(spec);
}

}  // namespace kennel::image
