// The registry's Prometheus metrics (names fixed by the deployment's
// dashboards), and an ObjectStore wrapper that times every storage call.
#ifndef KENNEL_SERVICES_REGISTRY_REGISTRY_METRICS_H_
#define KENNEL_SERVICES_REGISTRY_REGISTRY_METRICS_H_

#include <prometheus/counter.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>

#include <memory>
#include <string>

#include "common/storage/object_store.h"

namespace kennel::registry {

// Thread-safe (prometheus-cpp metrics are).
class RegistryMetrics {
 public:
  explicit RegistryMetrics(prometheus::Registry& registry);

  enum class Op { kPut, kGet, kHead, kList, kDelete };
  // Counts an error unless the status is an expected answer (a missing key,
  // an exclusive write that lost).
  void RecordStorage(Op op, absl::Duration elapsed, const absl::Status& status);

  prometheus::Counter& bytes_received;
  prometheus::Counter& bytes_sent;
  prometheus::Counter& versions_committed;

 private:
  static constexpr int kOps = 5;
  prometheus::Counter* errors_[kOps];
  prometheus::Histogram* seconds_[kOps];
};

// Forwards to another store and records each call's time and outcome.
// Thread-safe when the wrapped store is.
class InstrumentedStore : public storage::ObjectStore {
 public:
  InstrumentedStore(std::unique_ptr<storage::ObjectStore> store,
                    RegistryMetrics* metrics)
      : store_(std::move(store)), metrics_(metrics) {}

  std::string Describe() const override { return store_->Describe(); }
  bool is_local() const override { return store_->is_local(); }
  absl::StatusOr<bool> CheckExclusiveWrites() override {
    return store_->CheckExclusiveWrites();
  }
  absl::Status Put(const std::string& key, absl::string_view data,
                   const storage::WriteOptions& options) override;
  absl::StatusOr<std::unique_ptr<storage::ObjectWriter>> NewWriter(
      const std::string& key, const storage::WriteOptions& options) override;
  absl::Status Read(const std::string& key, int64_t offset, int64_t length,
                    const storage::ByteSink& sink) override;
  absl::Status ReadPieces(const std::string& key, int64_t offset,
                          int64_t length, int64_t piece_bytes,
                          const storage::PieceSink& sink) override;
  absl::StatusOr<storage::ObjectInfo> Stat(const std::string& key) override;
  absl::StatusOr<storage::ListResult> List(
      const storage::ListOptions& options) override;
  absl::Status Delete(const std::string& key) override;
  absl::StatusOr<int64_t> CleanStaging(absl::Time before) override {
    return store_->CleanStaging(before);
  }

 private:
  const std::unique_ptr<storage::ObjectStore> store_;
  RegistryMetrics* const metrics_;
};

}  // namespace kennel::registry

#endif  // KENNEL_SERVICES_REGISTRY_REGISTRY_METRICS_H_
