#include "common/names.h"

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace kennel {
namespace {

// Printable form for error messages: control bytes and non-ASCII escaped, and
// long input cut, so a hostile name cannot garble a log line.
std::string Printable(absl::string_view s) {
  constexpr size_t kMax = 80;
  std::string out;
  for (size_t i = 0; i < s.size() && i < kMax; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      absl::StrAppendFormat(&out, "\\x%02x", c);
    }
  }
  if (s.size() > kMax) out += "...";
  return out;
}

}  // namespace

absl::Status ValidateName(absl::string_view what, absl::string_view name) {
  bool ok = !name.empty() && name.size() <= 63;
  for (size_t i = 0; ok && i < name.size(); ++i) {
    char c = name[i];
    bool alnum = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
    ok = alnum || (i > 0 && (c == '.' || c == '_' || c == '-'));
  }
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrCat(
        "invalid ", what, " \"", Printable(name),
        "\": use 1 to 63 characters from a-z 0-9 . _ -, starting with a "
        "letter or digit"));
  }
  return absl::OkStatus();
}

std::string ModelRef::ToString() const {
  if (version > 0) return absl::StrCat(name, ":", version);
  if (!alias.empty()) return absl::StrCat(name, "@", alias);
  return name;
}

absl::StatusOr<ModelRef> ParseModelRef(absl::string_view ref) {
  ModelRef out;
  if (size_t at = ref.find('@'); at != absl::string_view::npos) {
    out.name = std::string(ref.substr(0, at));
    out.alias = std::string(ref.substr(at + 1));
    if (absl::Status s = ValidateName("alias", out.alias); !s.ok()) return s;
  } else if (size_t colon = ref.find(':'); colon != absl::string_view::npos) {
    out.name = std::string(ref.substr(0, colon));
    absl::string_view number = ref.substr(colon + 1);
    if (!absl::SimpleAtoi(number, &out.version) || out.version <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("invalid model ref \"", Printable(ref),
                       "\": the version after ':' must be a positive number"));
    }
  } else {
    out.name = std::string(ref);
  }
  if (absl::Status s = ValidateName("model name", out.name); !s.ok()) return s;
  return out;
}

absl::Status ValidateDigest(absl::string_view digest) {
  constexpr absl::string_view kPrefix = "sha256:";
  bool ok = digest.size() == kPrefix.size() + 64 &&
            digest.substr(0, kPrefix.size()) == kPrefix;
  for (size_t i = kPrefix.size(); ok && i < digest.size(); ++i) {
    char c = digest[i];
    ok = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
  }
  if (!ok) {
    return absl::InvalidArgumentError(absl::StrCat(
        "invalid digest \"", Printable(digest),
        "\": expected sha256: followed by 64 lowercase hex digits"));
  }
  return absl::OkStatus();
}

}  // namespace kennel
