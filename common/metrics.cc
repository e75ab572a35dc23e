#include "common/metrics.h"

#include <dirent.h>
#include <glog/logging.h>
#include <google/protobuf/descriptor.h>
#include <prometheus/exposer.h>
#include <prometheus/text_serializer.h>
#include <sys/resource.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kennel {
namespace {

// Standard process_* metrics read from /proc at scrape time, as the official
// client libraries export them.
class ProcessCollector : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<prometheus::MetricFamily> out;
    const double ticks = static_cast<double>(sysconf(_SC_CLK_TCK));
    const double page = static_cast<double>(sysconf(_SC_PAGESIZE));

    std::ifstream stat_file("/proc/self/stat");
    std::string stat((std::istreambuf_iterator<char>(stat_file)),
                     std::istreambuf_iterator<char>());
    // Fields after the command name, which is in parentheses and may hold
    // spaces.
    std::vector<std::string> fields;
    if (auto close = stat.rfind(')'); close != std::string::npos) {
      fields = absl::StrSplit(stat.substr(close + 2), ' ', absl::SkipEmpty());
    }
    auto field = [&](size_t stat_index) -> double {
      // stat_index is the 1-based field number of proc(5); fields[0] is 3.
      size_t i = stat_index - 3;
      return i < fields.size() ? std::strtod(fields[i].c_str(), nullptr) : 0;
    };
    Add(out, "process_cpu_seconds_total",
        "User and system CPU time spent in seconds.",
        prometheus::MetricType::Counter, (field(14) + field(15)) / ticks);
    Add(out, "process_virtual_memory_bytes", "Virtual memory size in bytes.",
        prometheus::MetricType::Gauge, field(23));
    Add(out, "process_resident_memory_bytes", "Resident memory size in bytes.",
        prometheus::MetricType::Gauge, field(24) * page);
    Add(out, "process_start_time_seconds",
        "Start time of the process since unix epoch in seconds.",
        prometheus::MetricType::Gauge, BootTime() + field(22) / ticks);
    Add(out, "process_open_fds", "Number of open file descriptors.",
        prometheus::MetricType::Gauge, OpenFds());
    rlimit limit{};
    if (getrlimit(RLIMIT_NOFILE, &limit) == 0) {
      Add(out, "process_max_fds", "Maximum number of open file descriptors.",
          prometheus::MetricType::Gauge, static_cast<double>(limit.rlim_cur));
    }
    return out;
  }

 private:
  static void Add(std::vector<prometheus::MetricFamily>& out, std::string name,
                  std::string help, prometheus::MetricType type, double value) {
    prometheus::MetricFamily family;
    family.name = std::move(name);
    family.help = std::move(help);
    family.type = type;
    prometheus::ClientMetric metric;
    if (type == prometheus::MetricType::Counter) {
      metric.counter.value = value;
    } else {
      metric.gauge.value = value;
    }
    family.metric.push_back(std::move(metric));
    out.push_back(std::move(family));
  }

  static double BootTime() {
    std::ifstream in("/proc/stat");
    std::string line;
    while (std::getline(in, line)) {
      if (absl::StartsWith(line, "btime ")) {
        return std::strtod(line.c_str() + 6, nullptr);
      }
    }
    return 0;
  }

  static double OpenFds() {
    DIR* dir = opendir("/proc/self/fd");
    if (dir == nullptr) return 0;
    double count = 0;
    while (dirent* entry = readdir(dir)) {
      if (entry->d_name[0] != '.') ++count;
    }
    closedir(dir);
    return count - 1;  // the descriptor opendir itself holds
  }
};

const char* CodeName(int code) {
  static const char* const kNames[] = {"OK",
                                       "CANCELLED",
                                       "UNKNOWN",
                                       "INVALID_ARGUMENT",
                                       "DEADLINE_EXCEEDED",
                                       "NOT_FOUND",
                                       "ALREADY_EXISTS",
                                       "PERMISSION_DENIED",
                                       "RESOURCE_EXHAUSTED",
                                       "FAILED_PRECONDITION",
                                       "ABORTED",
                                       "OUT_OF_RANGE",
                                       "UNIMPLEMENTED",
                                       "INTERNAL",
                                       "UNAVAILABLE",
                                       "DATA_LOSS",
                                       "UNAUTHENTICATED"};
  if (code < 0 || code > 16) return "UNKNOWN";
  return kNames[code];
}

class RpcMetricsInterceptor : public grpc::experimental::Interceptor {
 public:
  RpcMetricsInterceptor(RpcMetrics* metrics, std::string method)
      : metrics_(metrics),
        method_(std::move(method)),
        start_(std::chrono::steady_clock::now()) {
    auto [service, name] = metrics_->Labels(method_);
    metrics_->started.Add({{"grpc_service", service}, {"grpc_method", name}})
        .Increment();
  }

  ~RpcMetricsInterceptor() override {
    // A call cancelled by its client never sends a status.
    if (!recorded_) Finish(static_cast<int>(grpc::StatusCode::CANCELLED));
  }

  void Intercept(
      grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      Finish(static_cast<int>(methods->GetSendStatus().error_code()));
    }
    methods->Proceed();
  }

 private:
  void Finish(int code) {
    recorded_ = true;
    std::chrono::duration<double> elapsed =
        std::chrono::steady_clock::now() - start_;
    metrics_->Record(method_, code, elapsed.count());
  }

  RpcMetrics* metrics_;
  std::string method_;
  std::chrono::steady_clock::time_point start_;
  bool recorded_ = false;
};

class RpcMetricsInterceptorFactory
    : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit RpcMetricsInterceptorFactory(RpcMetrics* metrics)
      : metrics_(metrics) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new RpcMetricsInterceptor(metrics_,
                                     info->method() ? info->method() : "");
  }

 private:
  RpcMetrics* metrics_;
};

}  // namespace

prometheus::Histogram::BucketBoundaries LatencyBuckets() {
  return {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
          0.25,   0.5,   1,      2.5,   5,    10,    30,   60};
}

RpcMetrics::RpcMetrics(prometheus::Registry& registry)
    : started(prometheus::BuildCounter()
                  .Name("kennel_grpc_server_started_total")
                  .Help("RPCs started, by service and method.")
                  .Register(registry)),
      handled(prometheus::BuildCounter()
                  .Name("kennel_grpc_server_handled_total")
                  .Help("RPCs finished, by service, method and status code.")
                  .Register(registry)),
      latency(prometheus::BuildHistogram()
                  .Name("kennel_grpc_server_handling_seconds")
                  .Help("Time from the start of an RPC to its status (a "
                        "stream's whole life), by service and method.")
                  .Register(registry)),
      served_({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
               "/grpc.reflection.v1alpha.ServerReflection/"
               "ServerReflectionInfo",
               "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"}) {}

void RpcMetrics::Serve(absl::string_view service) {
  const google::protobuf::ServiceDescriptor* descriptor =
      google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(
          std::string(service));
  if (descriptor == nullptr) {
    LOG(WARNING) << "no descriptor for service " << service
                 << "; its RPCs are counted as unknown";
    return;
  }
  for (int i = 0; i < descriptor->method_count(); ++i) {
    served_.insert(
        absl::StrCat("/", service, "/", descriptor->method(i)->name()));
  }
}

std::pair<std::string, std::string> RpcMetrics::Labels(
    absl::string_view full_method) const {
  // The method name is whatever the client sent: only the methods this
  // process serves get labels of their own, the rest share "unknown".
  if (!served_.contains(full_method)) return {"unknown", "unknown"};
  std::vector<absl::string_view> parts =
      absl::StrSplit(full_method, '/', absl::SkipEmpty());
  return {std::string(parts[0]), std::string(parts[1])};
}

void RpcMetrics::Record(absl::string_view full_method, int code,
                        double seconds) {
  auto [service, method] = Labels(full_method);
  handled
      .Add({{"grpc_service", service},
            {"grpc_method", method},
            {"grpc_code", CodeName(code)}})
      .Increment();
  latency
      .Add({{"grpc_service", service}, {"grpc_method", method}},
           LatencyBuckets())
      .Observe(seconds);
}

Metrics::Metrics(std::string service)
    : registry_(std::make_shared<prometheus::Registry>()),
      process_(std::make_shared<ProcessCollector>()),
      rpc_(std::make_unique<RpcMetrics>(*registry_)) {
  prometheus::BuildGauge()
      .Name("kennel_build_info")
      .Help("Always 1; labels say which service and version this is.")
      .Register(*registry_)
      .Add({{"service", std::move(service)}, {"version", KENNEL_VERSION}})
      .Set(1);
}

Metrics::~Metrics() = default;

absl::Status Metrics::Start(const std::string& listen) {
  if (listen.empty()) return absl::OkStatus();
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(listen, 2);
  } catch (const std::exception& e) {
    return absl::UnavailableError("cannot serve metrics on " + listen + ": " +
                                  e.what());
  }
  exposer_->RegisterCollectable(registry_);
  exposer_->RegisterCollectable(process_);
  auto ports = exposer_->GetListeningPorts();
  port_ = ports.empty() ? 0 : ports.front();
  return absl::OkStatus();
}

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
Metrics::NewInterceptorFactory() {
  return std::make_unique<RpcMetricsInterceptorFactory>(rpc_.get());
}

std::string Metrics::Scrape() const {
  auto families = registry_->Collect();
  auto process = process_->Collect();
  families.insert(families.end(), process.begin(), process.end());
  return prometheus::TextSerializer().Serialize(families);
}

}  // namespace kennel
