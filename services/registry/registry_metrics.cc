#include "services/registry/registry_metrics.h"

#include "common/metrics.h"

namespace kennel::registry {
namespace {

constexpr const char* kOpNames[] = {"put", "get", "head", "list", "delete"};

// Times one call and records it when it goes out of scope.
class Timer {
 public:
  Timer(RegistryMetrics* metrics, RegistryMetrics::Op op)
      : metrics_(metrics), op_(op), start_(absl::Now()) {}
  const absl::Status& Done(const absl::Status& status) {
    if (metrics_ != nullptr)
      metrics_->RecordStorage(op_, absl::Now() - start_, status);
    return status;
  }

 private:
  RegistryMetrics* metrics_;
  RegistryMetrics::Op op_;
  absl::Time start_;
};

// Publishes through the wrapped writer, timing the commit as a put.
class InstrumentedWriter : public storage::ObjectWriter {
 public:
  InstrumentedWriter(std::unique_ptr<storage::ObjectWriter> writer,
                     RegistryMetrics* metrics)
      : writer_(std::move(writer)), metrics_(metrics) {}
  absl::Status Write(absl::string_view data) override {
    absl::Status status = writer_->Write(data);
    if (!status.ok()) Timer(metrics_, RegistryMetrics::Op::kPut).Done(status);
    return status;
  }
  absl::Status Commit() override {
    Timer timer(metrics_, RegistryMetrics::Op::kPut);
    return timer.Done(writer_->Commit());
  }
  int64_t bytes_written() const override { return writer_->bytes_written(); }

 private:
  std::unique_ptr<storage::ObjectWriter> writer_;
  RegistryMetrics* metrics_;
};

}  // namespace

RegistryMetrics::RegistryMetrics(prometheus::Registry& registry)
    : bytes_received(prometheus::BuildCounter()
                         .Name("kennel_registry_bytes_received_total")
                         .Help("Artifact bytes received in pushes and stored.")
                         .Register(registry)
                         .Add({})),
      bytes_sent(prometheus::BuildCounter()
                     .Name("kennel_registry_bytes_sent_total")
                     .Help("Artifact bytes sent to pulling clients.")
                     .Register(registry)
                     .Add({})),
      versions_committed(prometheus::BuildCounter()
                             .Name("kennel_registry_versions_committed_total")
                             .Help("Model versions committed by this process.")
                             .Register(registry)
                             .Add({})) {
  auto& errors = prometheus::BuildCounter()
                     .Name("kennel_registry_storage_errors_total")
                     .Help("Storage calls that failed, by operation.")
                     .Register(registry);
  auto& seconds = prometheus::BuildHistogram()
                      .Name("kennel_registry_storage_seconds")
                      .Help("Time spent in storage calls, by operation.")
                      .Register(registry);
  for (int i = 0; i < kOps; ++i) {
    errors_[i] = &errors.Add({{"op", kOpNames[i]}});
    seconds_[i] = &seconds.Add({{"op", kOpNames[i]}}, LatencyBuckets());
  }
}

void RegistryMetrics::RecordStorage(Op op, absl::Duration elapsed,
                                    const absl::Status& status) {
  const int i = static_cast<int>(op);
  seconds_[i]->Observe(absl::ToDoubleSeconds(elapsed));
  if (!status.ok() && !absl::IsNotFound(status) &&
      !absl::IsAlreadyExists(status) && !absl::IsCancelled(status)) {
    errors_[i]->Increment();
  }
}

absl::Status InstrumentedStore::Put(const std::string& key,
                                    absl::string_view data,
                                    const storage::WriteOptions& options) {
  Timer timer(metrics_, RegistryMetrics::Op::kPut);
  return timer.Done(store_->Put(key, data, options));
}

absl::StatusOr<std::unique_ptr<storage::ObjectWriter>>
InstrumentedStore::NewWriter(const std::string& key,
                             const storage::WriteOptions& options) {
  auto writer = store_->NewWriter(key, options);
  if (!writer.ok()) {
    Timer(metrics_, RegistryMetrics::Op::kPut).Done(writer.status());
    return writer.status();
  }
  return std::unique_ptr<storage::ObjectWriter>(
      new InstrumentedWriter(std::move(*writer), metrics_));
}

absl::Status InstrumentedStore::Read(const std::string& key, int64_t offset,
                                     int64_t length,
                                     const storage::ByteSink& sink) {
  Timer timer(metrics_, RegistryMetrics::Op::kGet);
  return timer.Done(store_->Read(key, offset, length, sink));
}

absl::Status InstrumentedStore::ReadPieces(const std::string& key,
                                           int64_t offset, int64_t length,
                                           int64_t piece_bytes,
                                           const storage::PieceSink& sink) {
  Timer timer(metrics_, RegistryMetrics::Op::kGet);
  return timer.Done(store_->ReadPieces(key, offset, length, piece_bytes, sink));
}

absl::StatusOr<storage::ObjectInfo> InstrumentedStore::Stat(
    const std::string& key) {
  Timer timer(metrics_, RegistryMetrics::Op::kHead);
  auto result = store_->Stat(key);
  timer.Done(result.status());
  return result;
}

absl::StatusOr<storage::ListResult> InstrumentedStore::List(
    const storage::ListOptions& options) {
  Timer timer(metrics_, RegistryMetrics::Op::kList);
  auto result = store_->List(options);
  timer.Done(result.status());
  return result;
}

absl::Status InstrumentedStore::Delete(const std::string& key) {
  Timer timer(metrics_, RegistryMetrics::Op::kDelete);
  return timer.Done(store_->Delete(key));
}

}  // namespace kennel::registry
