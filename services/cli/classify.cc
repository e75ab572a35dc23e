// kennel classify: sends image files to kennel-inference and prints the top
// classes of each, with the model version that answered.
#include <grpcpp/grpcpp.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/grpc_status.h"
#include "kennel/v1/inference.grpc.pb.h"
#include "services/cli/command.h"

ABSL_FLAG(int, top_k, 5, "classify: how many classes to show per image.");
ABSL_FLAG(std::string, model_ref, "",
          "classify: the model the answer must come from (NAME, NAME:VERSION "
          "or NAME@ALIAS); the server refuses with NOT_FOUND when it serves "
          "another.");

namespace kennel::cli {
namespace {

std::string ContentTypeFor(const std::string& path) {
  const std::string ext = path.substr(path.rfind('.') + 1);
  if (ext == "jpg" || ext == "jpeg" || ext == "JPG" || ext == "JPEG") {
    return "image/jpeg";
  }
  if (ext == "png" || ext == "PNG") return "image/png";
  if (ext == "webp") return "image/webp";
  if (ext == "bmp") return "image/bmp";
  return "";  // the server tells the format from the bytes
}

std::string JsonString(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c < 0x20) {
      out += absl::StrFormat("\\u%04x", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  return out + "\"";
}

int RunClassify(const std::vector<std::string>& args) {
  if (args.empty()) return UsageError("classify needs at least one IMAGE");
  const int top_k = absl::GetFlag(FLAGS_top_k);
  if (top_k < 1) return UsageError("--top-k must be at least 1");
  auto options = ClientOptionsFromFlags(kInferenceAddr);
  if (!options.ok()) return Fail(options.status());
  auto channel = MakeChannel(*options);
  if (!channel.ok()) return Fail(channel.status());
  auto stub = v1::Classifier::NewStub(*channel);

  const bool json = absl::GetFlag(FLAGS_json);
  std::vector<std::vector<std::string>> rows = {
      {"IMAGE", "RANK", "LABEL", "INDEX", "SCORE"}};
  std::vector<std::string> footers;
  std::vector<std::string> json_items;
  int failed = 0;
  for (const std::string& path : args) {
    std::error_code ec;
    if (std::filesystem::is_directory(path, ec)) {
      std::cerr << "kennel: " << path
                << ": is a folder; name the image files in it\n";
      ++failed;
      continue;
    }
    std::ifstream in(path, std::ios::binary);
    if (!in) {
      std::cerr << "kennel: " << path
                << ": cannot read the file: " << std::strerror(errno) << "\n";
      ++failed;
      continue;
    }
    std::stringstream bytes;
    bytes << in.rdbuf();
    v1::ClassifyRequest request;
    request.set_image(bytes.str());
    request.set_content_type(ContentTypeFor(path));
    request.set_top_k(top_k);
    request.set_model_ref(absl::GetFlag(FLAGS_model_ref));
    request.set_request_id(path);
    v1::ClassifyResponse response;
    grpc::ClientContext context;
    PrepareContext(*options, &context);
    const grpc::Status status = stub->Classify(&context, request, &response);
    if (!status.ok()) {
      const absl::Status s = FromGrpcStatus(status);
      std::cerr << "kennel: " << path << ": "
                << absl::StatusCodeToString(s.code()) << ": " << s.message()
                << "\n";
      ++failed;
      continue;
    }
    if (json) {
      json_items.push_back(absl::StrCat("{\"image\": ", JsonString(path),
                                        ", \"result\": ", ToJson(response),
                                        "}"));
      continue;
    }
    for (int i = 0; i < response.predictions_size(); ++i) {
      const v1::Prediction& p = response.predictions(i);
      rows.push_back({i == 0 ? path : "", absl::StrCat(i + 1), p.label(),
                      absl::StrCat(p.index()),
                      absl::StrFormat("%.4f", p.score())});
    }
    footers.push_back(absl::StrFormat(
        "%s: %s:%d (%s, %s) in %.1f ms (decode %.1f, queue %.1f, model %.1f, "
        "batch of %d)",
        path, response.model_name(), response.model_version(),
        response.model_digest().substr(0, 19),
        response.precision() == v1::PRECISION_BF16 ? "bf16" : "fp32",
        response.timings().total_us() / 1000.0,
        response.timings().decode_us() / 1000.0,
        response.timings().queue_us() / 1000.0,
        response.timings().model_us() / 1000.0,
        response.timings().batch_size()));
  }
  if (json) {
    std::cout << "[";
    for (size_t i = 0; i < json_items.size(); ++i) {
      std::cout << (i ? ",\n " : "") << json_items[i];
    }
    std::cout << "]\n";
  } else if (rows.size() > 1) {
    std::cout << Table(rows);
    for (const std::string& f : footers) std::cout << f << "\n";
  }
  return failed == 0 ? kExitOk : kExitFailed;
}

KENNEL_CLI_COMMAND(
    {"classify", "classify image files with kennel-inference",
     "Usage: kennel classify IMAGE... [--addr HOST:PORT] [--top-k 5] "
     "[--model-ref REF] [--json]\n"
     "\n"
     "Sends each IMAGE (JPEG, PNG, WebP or BMP) to kennel-inference at --addr\n"
     "(default 127.0.0.1:50053) and prints its --top-k classes with softmax\n"
     "scores, then which model version answered, in which precision, and "
     "where\n"
     "the time went. --model-ref makes the server refuse (NOT_FOUND) unless "
     "it\n"
     "serves that model. With --json, prints a JSON array of\n"
     "{\"image\": PATH, \"result\": ClassifyResponse}.\n"
     "\n"
     "Exit status: 0 when every image was classified, 1 when any failed (each\n"
     "failure is printed on stderr), 2 for a bad command line.\n"
     "\n"
     "Examples:\n"
     "  kennel classify dog.jpg --addr 127.0.0.1:50053\n"
     "  kennel classify *.jpg --top-k 1 --json\n",
     &RunClassify});

}  // namespace
}  // namespace kennel::cli
