// ModelStore against both kinds of backend through the ObjectStore
// interface: a folder in a temp dir, and an in-memory stand-in for S3.
#include "services/registry/model_store.h"

#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "common/sha256.h"
#include "common/storage/file_store.h"
#include "common/storage/memory_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kennel::registry {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

std::string RandomBytes(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string out(n, '\0');
  for (char& c : out) c = static_cast<char>(rng() & 0xff);
  return out;
}

class ModelStoreTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    // "+segments": blobs above 2 MiB are read in 1 MiB segments by parallel
    // threads, as large blobs are with the default 4 MiB segments.
    segmented_ = absl::EndsWith(GetParam(), "+segments");
    if (absl::StartsWith(GetParam(), "file")) {
      char tmpl[] = "/tmp/kennel-model-store-XXXXXX";
      ASSERT_NE(mkdtemp(tmpl), nullptr);
      dir_ = tmpl;
      auto store = storage::FileStore::Open(dir_);
      ASSERT_TRUE(store.ok());
      object_store_ = std::move(*store);
    } else {
      memory_ = std::make_shared<storage::MemoryStore>();
      object_store_ = memory_;
    }
    ModelStoreOptions options;
    if (segmented_) options.read_segment_bytes = 1 << 20;
    store_ = std::make_unique<ModelStore>(object_store_, options);
    ASSERT_TRUE(store_->Init().ok());
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  // Stores `bytes` as a blob and returns its digest.
  std::string PutBlob(const std::string& bytes) {
    const std::string digest = Sha256Digest(bytes);
    auto upload = store_->StartBlob(digest, bytes.size());
    EXPECT_TRUE(upload.ok()) << upload.status();
    EXPECT_TRUE((*upload)->Write(bytes).ok());
    absl::Status finished = (*upload)->Finish();
    EXPECT_TRUE(finished.ok()) << finished;
    return digest;
  }

  v1::PushHeader Header(const std::string& name, const std::string& bytes) {
    v1::PushHeader header;
    header.set_name(name);
    auto* c = header.add_components();
    c->set_digest(Sha256Digest(bytes));
    c->set_size(bytes.size());
    header.add_labels("cat");
    header.add_labels("dog");
    return header;
  }

  absl::StatusOr<v1::ModelVersion> Push(const std::string& name,
                                        const std::string& bytes) {
    PutBlob(bytes);
    return store_->Commit(Header(name, bytes));
  }

  // Replaces an object's bytes behind the store's back (corruption).
  void Overwrite(const std::string& key, const std::string& bytes) {
    if (memory_) {
      memory_->Overwrite(key, bytes);
    } else {
      std::ofstream(dir_ + "/" + key, std::ios::binary | std::ios::trunc)
          << bytes;
    }
  }

  std::string ReadBlob(const v1::Component& c, absl::Status* status) {
    std::string out;
    *status = store_->ReadBlob(c, [&](absl::string_view d) {
      out.append(d.data(), d.size());
      return absl::OkStatus();
    });
    return out;
  }

  bool segmented_ = false;
  std::string dir_;
  std::shared_ptr<storage::MemoryStore> memory_;
  std::shared_ptr<storage::ObjectStore> object_store_;
  std::unique_ptr<ModelStore> store_;
};

TEST_P(ModelStoreTest, CommitAllocatesVersionsAndRefsResolve) {
  auto v1 = Push("dogs", "model one");
  ASSERT_TRUE(v1.ok()) << v1.status();
  EXPECT_EQ(v1->version(), 1);
  EXPECT_EQ(v1->components(0).format(), "torchscript");
  EXPECT_THAT(v1->labels(), ElementsAre("cat", "dog"));
  auto v2 = Push("dogs", "model two");
  ASSERT_TRUE(v2.ok());
  EXPECT_EQ(v2->version(), 2);

  auto latest = store_->Resolve("dogs");
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(latest->version(), 2);
  EXPECT_EQ(latest->components(0).digest(), Sha256Digest("model two"));
  auto first = store_->Resolve("dogs:1");
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->components(0).digest(), Sha256Digest("model one"));
  EXPECT_TRUE(absl::IsNotFound(store_->Resolve("dogs:3").status()));
  EXPECT_TRUE(absl::IsNotFound(store_->Resolve("cats").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(store_->Resolve("Dogs").status()));
  EXPECT_TRUE(absl::IsInvalidArgument(store_->Resolve("dogs:0").status()));
}

TEST_P(ModelStoreTest, BlobMustMatchItsDeclaration) {
  const std::string bytes = "some model bytes";
  auto wrong = store_->StartBlob(Sha256Digest("other"), bytes.size());
  ASSERT_TRUE(wrong.ok());
  ASSERT_TRUE((*wrong)->Write(bytes).ok());
  absl::Status s = (*wrong)->Finish();
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("hash to"));

  auto truncated = store_->StartBlob(Sha256Digest(bytes), bytes.size());
  ASSERT_TRUE((*truncated)->Write(bytes.substr(0, 5)).ok());
  s = (*truncated)->Finish();
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("truncated"));

  auto longer = store_->StartBlob(Sha256Digest(bytes), 3);
  EXPECT_TRUE(absl::IsInvalidArgument((*longer)->Write(bytes)));

  auto present =
      store_->PresentBlobs({Sha256Digest(bytes), Sha256Digest("other")});
  ASSERT_TRUE(present.ok());
  EXPECT_TRUE(present->empty());
}

TEST_P(ModelStoreTest, CommitNeedsEveryBlob) {
  absl::Status s = store_->Commit(Header("dogs", "never uploaded")).status();
  EXPECT_TRUE(absl::IsFailedPrecondition(s)) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("not stored"));
  EXPECT_TRUE(absl::IsNotFound(store_->Resolve("dogs").status()));
}

TEST_P(ModelStoreTest, CrashBeforeManifestLeavesNoVersion) {
  PutBlob("orphan bytes");  // blob written, manifest never
  EXPECT_TRUE(absl::IsNotFound(store_->Resolve("dogs").status()));
  auto models = store_->ListModels();
  ASSERT_TRUE(models.ok());
  EXPECT_EQ(models->models_size(), 0);
  auto next = Push("dogs", "orphan bytes");
  ASSERT_TRUE(next.ok());
  EXPECT_EQ(next->version(), 1);
}

TEST_P(ModelStoreTest, ConcurrentPushesGetDistinctVersions) {
  constexpr int kPushers = 8;
  std::vector<std::thread> threads;
  std::vector<int64_t> versions(kPushers, 0);
  for (int i = 0; i < kPushers; ++i) {
    threads.emplace_back([&, i] {
      auto v = Push("dogs", absl::StrCat("model ", i));
      if (v.ok()) versions[i] = v->version();
    });
  }
  for (auto& t : threads) t.join();
  std::set<int64_t> distinct(versions.begin(), versions.end());
  EXPECT_EQ(distinct, (std::set<int64_t>{1, 2, 3, 4, 5, 6, 7, 8}));
  for (int i = 0; i < kPushers; ++i) {
    auto m = store_->Resolve(absl::StrCat("dogs:", versions[i]));
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(m->components(0).digest(),
              Sha256Digest(absl::StrCat("model ", i)));
  }
}

TEST_P(ModelStoreTest, AliasesPointAtVersionsAndGuardDeletion) {
  ASSERT_TRUE(Push("dogs", "a").ok());
  ASSERT_TRUE(Push("dogs", "b").ok());
  EXPECT_TRUE(absl::IsNotFound(store_->SetAlias("dogs", "prod", 9).status()));
  auto alias = store_->SetAlias("dogs", "prod", 1);
  ASSERT_TRUE(alias.ok()) << alias.status();
  EXPECT_EQ(alias->version(), 1);
  auto prod = store_->Resolve("dogs@prod");
  ASSERT_TRUE(prod.ok());
  EXPECT_EQ(prod->version(), 1);
  EXPECT_THAT(prod->aliases(), ElementsAre("prod"));

  absl::Status refused = store_->DeleteVersion("dogs", 1);
  EXPECT_TRUE(absl::IsFailedPrecondition(refused)) << refused;
  EXPECT_THAT(std::string(refused.message()), HasSubstr("prod"));

  ASSERT_TRUE(store_->SetAlias("dogs", "prod", 2).ok());
  EXPECT_EQ(store_->Resolve("dogs@prod")->version(), 2);
  ASSERT_TRUE(store_->DeleteVersion("dogs", 1).ok());
  EXPECT_TRUE(absl::IsNotFound(store_->Resolve("dogs:1").status()));
  EXPECT_TRUE(absl::IsNotFound(store_->DeleteVersion("dogs", 1)));

  ASSERT_TRUE(store_->DeleteAlias("dogs", "prod").ok());
  EXPECT_TRUE(absl::IsNotFound(store_->Resolve("dogs@prod").status()));
  EXPECT_TRUE(absl::IsNotFound(store_->DeleteAlias("dogs", "prod")));
  ASSERT_TRUE(store_->DeleteVersion("dogs", 2).ok());
  EXPECT_TRUE(absl::IsNotFound(store_->Resolve("dogs").status()));
  // Numbers of deleted versions are never handed out again.
  auto v3 = Push("dogs", "c");
  ASSERT_TRUE(v3.ok());
  EXPECT_EQ(v3->version(), 3);
}

TEST_P(ModelStoreTest, PushHeaderAliasesAreSetAfterCommit) {
  PutBlob("x");
  v1::PushHeader header = Header("dogs", "x");
  header.add_aliases("staging");
  auto v = store_->Commit(header);
  ASSERT_TRUE(v.ok());
  EXPECT_THAT(v->aliases(), ElementsAre("staging"));
  EXPECT_EQ(store_->Resolve("dogs@staging")->version(), 1);
}

TEST_P(ModelStoreTest, ListsModelsAndPagesVersionsNewestFirst) {
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(Push("dogs", absl::StrCat(i)).ok());
  ASSERT_TRUE(Push("cats", "c").ok());
  ASSERT_TRUE(store_->SetAlias("dogs", "prod", 3).ok());
  auto models = store_->ListModels();
  ASSERT_TRUE(models.ok()) << models.status();
  ASSERT_EQ(models->models_size(), 2);
  EXPECT_EQ(models->models(0).name(), "cats");
  EXPECT_EQ(models->models(1).name(), "dogs");
  EXPECT_EQ(models->models(1).latest_version(), 5);
  EXPECT_EQ(models->models(1).version_count(), 5);
  ASSERT_EQ(models->models(1).aliases_size(), 1);
  EXPECT_EQ(models->models(1).aliases(0).version(), 3);
  EXPECT_GT(models->models(1).updated_at().seconds(), 0);

  std::vector<int64_t> seen;
  v1::ListVersionsRequest request;
  request.set_name("dogs");
  request.set_page_size(2);
  int pages = 0;
  while (true) {
    auto page = store_->ListVersions(request);
    ASSERT_TRUE(page.ok()) << page.status();
    ++pages;
    for (const auto& v : page->versions()) {
      seen.push_back(v.version());
      if (v.version() == 3) EXPECT_THAT(v.aliases(), ElementsAre("prod"));
    }
    if (page->next_page_token().empty()) break;
    request.set_page_token(page->next_page_token());
  }
  EXPECT_EQ(pages, 3);
  EXPECT_THAT(seen, ElementsAre(5, 4, 3, 2, 1));
  request.set_page_token("garbage");
  EXPECT_TRUE(absl::IsInvalidArgument(store_->ListVersions(request).status()));
  request.set_name("birds");
  request.clear_page_token();
  EXPECT_TRUE(absl::IsNotFound(store_->ListVersions(request).status()));
}

TEST_P(ModelStoreTest, CorruptChunkIsRefusedBeforeItIsSent) {
  const std::string good = RandomBytes((3 << 20) + 100, 11);
  auto v = Push("dogs", good);
  ASSERT_TRUE(v.ok());
  const v1::Component& c = v->components(0);
  absl::Status status;
  EXPECT_EQ(ReadBlob(c, &status), good);
  ASSERT_TRUE(status.ok()) << status;

  // The bad byte is in the third chunk: the two chunks before it were
  // checked and may go, the third never does.
  std::string corrupt = good;
  corrupt[(2 << 20) + 7] ^= 1;
  Overwrite(ModelStore::BlobKey(c.digest()), corrupt);
  std::string delivered = ReadBlob(c, &status);
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("corrupt"));
  EXPECT_THAT(std::string(status.message()), HasSubstr("chunk 2"));
  EXPECT_EQ(delivered, good.substr(0, 2 << 20));

  // In the first chunk: nothing at all is delivered.
  corrupt = good;
  corrupt[5] ^= 1;
  Overwrite(ModelStore::BlobKey(c.digest()), corrupt);
  EXPECT_EQ(ReadBlob(c, &status), "");
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;

  // In the short last chunk: caught by the digest, before it is delivered.
  corrupt = good;
  corrupt.back() ^= 1;
  Overwrite(ModelStore::BlobKey(c.digest()), corrupt);
  EXPECT_EQ(ReadBlob(c, &status), good.substr(0, 3 << 20));
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;

  // Longer or shorter than the manifest says: corrupt, and the last chunk
  // is not delivered.
  Overwrite(ModelStore::BlobKey(c.digest()), good + "x");
  EXPECT_EQ(ReadBlob(c, &status), good.substr(0, 3 << 20));
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  Overwrite(ModelStore::BlobKey(c.digest()), good.substr(0, 2 << 20));
  EXPECT_EQ(ReadBlob(c, &status), good.substr(0, 2 << 20));
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;

  ASSERT_TRUE(object_store_->Delete(ModelStore::BlobKey(c.digest())).ok());
  status = store_->ReadBlob(c, [](absl::string_view) {
    ADD_FAILURE() << "a missing blob delivered bytes";
    return absl::OkStatus();
  });
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("missing"));
}

TEST_P(ModelStoreTest, ChunksArriveWhole) {
  const std::string good = RandomBytes((2 << 20) + 5, 12);
  auto v = Push("dogs", good);
  ASSERT_TRUE(v.ok());
  std::vector<std::pair<int64_t, size_t>> chunks;
  std::string joined;
  ASSERT_TRUE(store_
                  ->ReadBlobChunks(v->components(0),
                                   [&](int64_t offset, std::string* chunk) {
                                     chunks.emplace_back(offset, chunk->size());
                                     joined += *chunk;
                                     return absl::OkStatus();
                                   })
                  .ok());
  EXPECT_THAT(chunks,
              ElementsAre(std::make_pair(int64_t{0}, size_t{1} << 20),
                          std::make_pair(int64_t{1} << 20, size_t{1} << 20),
                          std::make_pair(int64_t{2} << 20, size_t{5})));
  EXPECT_EQ(joined, good);

  // An empty blob (here a head beside the model; an empty model is
  // refused) is read as nothing, successfully.
  PutBlob("model");
  v1::PushHeader with_empty = Header("empty", "model");
  v1::ComponentSpec* head = with_empty.add_components();
  head->set_role(v1::COMPONENT_ROLE_HEAD);
  head->set_digest(PutBlob(""));
  head->set_size(0);
  auto empty = store_->Commit(with_empty);
  ASSERT_TRUE(empty.ok()) << empty.status();
  absl::Status status;
  EXPECT_EQ(ReadBlob(empty->components(1), &status), "");
  EXPECT_TRUE(status.ok()) << status;
}

TEST_P(ModelStoreTest, SinkErrorStopsTheRead) {
  const std::string good = RandomBytes((9 << 20) + 3, 16);
  auto v = Push("dogs", good);
  ASSERT_TRUE(v.ok());
  int calls = 0;
  absl::Status status = store_->ReadBlobChunks(
      v->components(0), [&](int64_t offset, std::string* chunk) {
        EXPECT_TRUE(*chunk == good.substr(offset, 1 << 20)) << offset;
        return ++calls == 3 ? absl::CancelledError("client went away")
                            : absl::OkStatus();
      });
  EXPECT_TRUE(absl::IsCancelled(status)) << status;
  EXPECT_EQ(calls, 3);

  // A bad byte late in the blob: every chunk before it is delivered, in
  // order, and nothing after.
  std::string corrupt = good;
  corrupt[(7 << 20) + 1] ^= 1;
  Overwrite(ModelStore::BlobKey(v->components(0).digest()), corrupt);
  std::string delivered = ReadBlob(v->components(0), &status);
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_EQ(delivered.size(), size_t{7} << 20);
  EXPECT_TRUE(delivered == good.substr(0, 7 << 20));
}

TEST_P(ModelStoreTest, LargeUploadsAreWrittenBehindTheHash) {
  // Large enough to be written by the upload's own thread.
  const std::string good = RandomBytes((10 << 20) + 7, 17);
  const std::string digest = Sha256Digest(good);
  auto send = [&](BlobUpload* upload, size_t upto) {
    for (size_t at = 0; at < upto; at += 1 << 20) {
      std::string piece = good.substr(at, std::min<size_t>(1 << 20, upto - at));
      absl::Status s = upload->Write(&piece);
      if (!s.ok()) return s;
      EXPECT_TRUE(piece.empty());  // a spare buffer, not the bytes sent
    }
    return absl::OkStatus();
  };

  // Abandoned half way: nothing is stored, the staged bytes are dropped.
  {
    auto upload = store_->StartBlob(digest, good.size());
    ASSERT_TRUE(upload.ok());
    ASSERT_TRUE(send(upload->get(), 5 << 20).ok());
  }
  if (memory_) EXPECT_EQ(memory_->open_writers(), 0);
  EXPECT_TRUE(store_->PresentBlobs({digest})->empty());

  // Declared with another digest: refused, nothing stored.
  auto wrong = store_->StartBlob(Sha256Digest("other"), good.size());
  ASSERT_TRUE(wrong.ok());
  ASSERT_TRUE(send(wrong->get(), good.size()).ok());
  EXPECT_TRUE(absl::IsInvalidArgument((*wrong)->Finish()));
  EXPECT_TRUE(store_->PresentBlobs({Sha256Digest("other")})->empty());

  if (memory_) {
    // A storage failure while the bytes are written reaches the caller.
    auto failing = store_->StartBlob(digest, good.size());
    ASSERT_TRUE(failing.ok());
    ASSERT_TRUE(send(failing->get(), 2 << 20).ok());
    memory_->set_failure(absl::UnavailableError("storage is down"));
    absl::Status s = send(failing->get(), good.size());
    if (s.ok()) s = (*failing)->Finish();
    EXPECT_TRUE(absl::IsUnavailable(s)) << s;
    memory_->set_failure(absl::OkStatus());
    failing->reset();
    EXPECT_TRUE(store_->PresentBlobs({digest})->empty());
  }

  auto upload = store_->StartBlob(digest, good.size());
  ASSERT_TRUE(upload.ok());
  ASSERT_TRUE(send(upload->get(), good.size()).ok());
  absl::Status finished = (*upload)->Finish();
  ASSERT_TRUE(finished.ok()) << finished;
  v1::Component c;
  c.set_digest(digest);
  c.set_size(good.size());
  absl::Status status;
  EXPECT_TRUE(ReadBlob(c, &status) == good);
  EXPECT_TRUE(status.ok()) << status;
  EXPECT_TRUE(object_store_->Stat(ModelStore::IndexKey(digest)).ok());
}

TEST_P(ModelStoreTest, BlobWithoutIndexIsCheckedWholeThenIndexed) {
  // A blob as a registry without chunk indexes stored it.
  const std::string good = RandomBytes((2 << 20) + 9, 13);
  auto v = Push("dogs", good);
  ASSERT_TRUE(v.ok());
  const v1::Component& c = v->components(0);
  const std::string index_key = ModelStore::IndexKey(c.digest());
  ASSERT_TRUE(object_store_->Stat(index_key).ok());
  ASSERT_TRUE(object_store_->Delete(index_key).ok());

  // Corrupt anywhere: refused before the first byte, and no index is made.
  std::string corrupt = good;
  corrupt[(2 << 20) + 3] ^= 1;
  Overwrite(ModelStore::BlobKey(c.digest()), corrupt);
  absl::Status status;
  EXPECT_EQ(ReadBlob(c, &status), "");
  EXPECT_TRUE(absl::IsDataLoss(status)) << status;
  EXPECT_THAT(std::string(status.message()), HasSubstr("corrupt"));
  EXPECT_TRUE(absl::IsNotFound(object_store_->Stat(index_key).status()));

  // Intact: served, and its index written for the next read.
  Overwrite(ModelStore::BlobKey(c.digest()), good);
  EXPECT_EQ(ReadBlob(c, &status), good);
  EXPECT_TRUE(status.ok()) << status;
  auto stored = object_store_->ReadAll(index_key);
  ASSERT_TRUE(stored.ok()) << stored.status();
  auto index = ChunkIndex::Decode(*stored);
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_EQ(index->digest, c.digest());
  EXPECT_EQ(index->size, c.size());
  EXPECT_EQ(index->states.size(), 2u);
}

TEST_P(ModelStoreTest, DamagedOrForeignIndexIsReplaced) {
  const std::string good = RandomBytes((2 << 20) + 1, 14);
  const std::string other = RandomBytes(3 << 20, 15);
  auto v = Push("dogs", good);
  ASSERT_TRUE(v.ok());
  PutBlob(other);
  const v1::Component& c = v->components(0);
  const std::string index_key = ModelStore::IndexKey(c.digest());
  auto original = object_store_->ReadAll(index_key);
  ASSERT_TRUE(original.ok());

  std::string damaged = *original;
  damaged[80] ^= 1;
  auto foreign =
      object_store_->ReadAll(ModelStore::IndexKey(Sha256Digest(other)));
  ASSERT_TRUE(foreign.ok());
  for (const std::string& bad : {damaged, *foreign, std::string("junk")}) {
    Overwrite(index_key, bad);
    // A fresh store, as after a restart: one that has used the index keeps
    // it in memory and never rereads it.
    store_ = std::make_unique<ModelStore>(object_store_);
    absl::Status status;
    EXPECT_EQ(ReadBlob(c, &status), good);
    EXPECT_TRUE(status.ok()) << status;
    EXPECT_EQ(*object_store_->ReadAll(index_key), *original);
  }
}

TEST_P(ModelStoreTest, GarbageCollectRemovesOldUnreferencedBlobsOnly) {
  ASSERT_TRUE(Push("dogs", "kept").ok());
  const std::string old_orphan = PutBlob("old orphan");
  const std::string young_orphan = PutBlob("young orphan");
  ASSERT_TRUE(Push("dogs", "deleted later").ok());
  ASSERT_TRUE(store_->DeleteVersion("dogs", 2).ok());
  const std::string deleted = Sha256Digest("deleted later");
  auto age = [&](const std::string& digest) {
    const std::string key = ModelStore::BlobKey(digest);
    const absl::Time past = absl::Now() - absl::Hours(2);
    if (memory_) {
      memory_->SetModified(key, past);
    } else {
      std::filesystem::last_write_time(
          dir_ + "/" + key, std::filesystem::file_time_type::clock::now() -
                                std::chrono::hours(2));
    }
  };
  age(old_orphan);
  age(deleted);
  age(Sha256Digest("kept"));

  auto dry = store_->GarbageCollect(absl::Hours(1), /*dry_run=*/true);
  ASSERT_TRUE(dry.ok()) << dry.status();
  EXPECT_THAT(dry->removed_digests(),
              UnorderedElementsAre(old_orphan, deleted));
  EXPECT_EQ(store_->PresentBlobs({old_orphan})->size(), 1u);

  auto gc = store_->GarbageCollect(absl::Hours(1), /*dry_run=*/false);
  ASSERT_TRUE(gc.ok()) << gc.status();
  EXPECT_THAT(gc->removed_digests(), UnorderedElementsAre(old_orphan, deleted));
  EXPECT_EQ(gc->removed_bytes(), 10 + 13);
  EXPECT_EQ(gc->kept_blobs(), 2);
  auto present = store_->PresentBlobs(
      {old_orphan, young_orphan, deleted, Sha256Digest("kept")});
  ASSERT_TRUE(present.ok());
  EXPECT_THAT(*present,
              UnorderedElementsAre(young_orphan, Sha256Digest("kept")));
  absl::Status status;
  EXPECT_EQ(ReadBlob(store_->Resolve("dogs")->components(0), &status), "kept");
  EXPECT_TRUE(status.ok());
}

TEST_P(ModelStoreTest, GarbageCollectRemovesIndexesWithTheirBlobs) {
  ASSERT_TRUE(Push("dogs", "kept").ok());
  const std::string orphan = PutBlob("orphan");
  const std::string gone_old = Sha256Digest("gone, index left old");
  const std::string gone_young = Sha256Digest("gone, index left young");
  ASSERT_TRUE(object_store_->Put(ModelStore::IndexKey(gone_old), "x", {}).ok());
  ASSERT_TRUE(
      object_store_->Put(ModelStore::IndexKey(gone_young), "x", {}).ok());
  auto age = [&](const std::string& key) {
    if (memory_) {
      memory_->SetModified(key, absl::Now() - absl::Hours(2));
    } else {
      std::filesystem::last_write_time(
          dir_ + "/" + key, std::filesystem::file_time_type::clock::now() -
                                std::chrono::hours(2));
    }
  };
  for (const std::string& digest : {orphan, Sha256Digest("kept")}) {
    age(ModelStore::BlobKey(digest));
    age(ModelStore::IndexKey(digest));
  }
  age(ModelStore::IndexKey(gone_old));

  auto gc = store_->GarbageCollect(absl::Hours(1), /*dry_run=*/false);
  ASSERT_TRUE(gc.ok()) << gc.status();
  EXPECT_THAT(gc->removed_digests(), ElementsAre(orphan));
  EXPECT_EQ(gc->kept_blobs(), 1);
  auto exists = [&](const std::string& key) {
    return object_store_->Stat(key).ok();
  };
  EXPECT_TRUE(exists(ModelStore::IndexKey(Sha256Digest("kept"))));
  EXPECT_FALSE(exists(ModelStore::IndexKey(orphan)));
  EXPECT_FALSE(exists(ModelStore::IndexKey(gone_old)));
  EXPECT_TRUE(exists(ModelStore::IndexKey(gone_young)));
}

TEST_P(ModelStoreTest, BadHeadersAreRefusedWithoutTouchingStorage) {
  if (memory_) memory_->set_failure(absl::UnavailableError("storage is down"));
  v1::PushHeader good = Header("dogs", "x");
  std::vector<std::pair<std::string, v1::PushHeader>> cases;
  auto add = [&](const std::string& what, auto edit) {
    v1::PushHeader h = good;
    edit(h);
    cases.emplace_back(what, h);
  };
  add("bad name", [](v1::PushHeader& h) { h.set_name("../etc"); });
  add("upper case", [](v1::PushHeader& h) { h.set_name("Dogs"); });
  add("long name", [](v1::PushHeader& h) { h.set_name(std::string(64, 'a')); });
  add("no components", [](v1::PushHeader& h) { h.clear_components(); });
  add("bad digest", [](v1::PushHeader& h) {
    h.mutable_components(0)->set_digest("sha256:xyz");
  });
  add("negative size",
      [](v1::PushHeader& h) { h.mutable_components(0)->set_size(-1); });
  add("bad alias", [](v1::PushHeader& h) { h.add_aliases("Prod!"); });
  add("bad format",
      [](v1::PushHeader& h) { h.mutable_components(0)->set_format("../x"); });
  add("too many components", [](v1::PushHeader& h) {
    for (int i = 0; i < 20; ++i) *h.add_components() = h.components(0);
  });
  add("oversized header", [](v1::PushHeader& h) {
    for (int i = 0; i < 6000; ++i) h.add_labels(std::string(200, 'l'));
  });
  // Versions that could be stored but never served.
  add("empty label", [](v1::PushHeader& h) { h.add_labels(""); });
  add("duplicate label", [](v1::PushHeader& h) { h.add_labels("cat"); });
  add("long label",
      [](v1::PushHeader& h) { h.add_labels(std::string(300, 'l')); });
  for (const char* bytes :
       {"\xff", "caf\xc3", "\xc0\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80",
        "a\x80"
        "b"}) {
    add(absl::StrCat("label not UTF-8: ", absl::CHexEscape(bytes)),
        [bytes](v1::PushHeader& h) { h.add_labels(bytes); });
  }
  auto preprocessing = [&](const std::string& what, auto edit) {
    add("preprocessing: " + what, [edit](v1::PushHeader& h) {
      v1::Preprocessing* p = h.mutable_preprocessing();
      p->set_input_size(224);
      p->set_resize(256);
      edit(*p);
    });
  };
  preprocessing("unset (input_size 0)",
                [](v1::Preprocessing& p) { p.set_input_size(0); });
  preprocessing("input_size -3",
                [](v1::Preprocessing& p) { p.set_input_size(-3); });
  preprocessing("input_size 2^30",
                [](v1::Preprocessing& p) { p.set_input_size(1 << 30); });
  preprocessing("std 0", [](v1::Preprocessing& p) {
    for (float v : {0.5f, 0.5f, 0.5f}) p.add_mean(v);
    for (float v : {0.2f, 0.0f, 0.2f}) p.add_std(v);
  });
  preprocessing("std NaN", [](v1::Preprocessing& p) {
    for (float v : {0.2f, NAN, 0.2f}) p.add_std(v);
  });
  preprocessing("two means", [](v1::Preprocessing& p) {
    p.add_mean(0.5f);
    p.add_mean(0.5f);
  });
  preprocessing("four stds", [](v1::Preprocessing& p) {
    for (int i = 0; i < 4; ++i) p.add_std(0.2f);
  });
  preprocessing("resize below input_size",
                [](v1::Preprocessing& p) { p.set_resize(200); });
  preprocessing("resize -1", [](v1::Preprocessing& p) { p.set_resize(-1); });
  preprocessing("unknown resize mode", [](v1::Preprocessing& p) {
    p.set_resize_mode(static_cast<v1::ResizeMode>(9));
  });
  preprocessing("unknown colour order", [](v1::Preprocessing& p) {
    p.set_color_order(static_cast<v1::ColorOrder>(7));
  });
  add("unknown role", [](v1::PushHeader& h) {
    h.mutable_components(0)->set_role(static_cast<v1::ComponentRole>(77));
  });
  add("unknown format",
      [](v1::PushHeader& h) { h.mutable_components(0)->set_format("onnx"); });
  add("no model component", [](v1::PushHeader& h) {
    h.mutable_components(0)->set_role(v1::COMPONENT_ROLE_BACKBONE);
  });
  add("two model components", [](v1::PushHeader& h) {
    v1::ComponentSpec* c = h.add_components();
    c->set_digest(Sha256Digest("y"));
    c->set_size(1);
  });
  add("empty model", [](v1::PushHeader& h) {
    h.mutable_components(0)->set_digest(Sha256Digest(""));
    h.mutable_components(0)->set_size(0);
  });
  for (const auto& [what, header] : cases) {
    absl::Status s = store_->ValidateHeader(header);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << what << ": " << s;
    EXPECT_FALSE(s.message().empty()) << what;
    s = store_->Commit(header).status();
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << what << ": " << s;
  }
  EXPECT_TRUE(
      absl::IsInvalidArgument(store_->SetAlias("../x", "prod", 1).status()));
  EXPECT_TRUE(
      absl::IsInvalidArgument(store_->SetAlias("dogs", "a/b", 1).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(store_->DeleteVersion("a b", 1)));
  if (memory_) {
    EXPECT_EQ(memory_->object_count(), 0);
    EXPECT_TRUE(absl::IsUnavailable(store_->Resolve("dogs").status()));
  }
}

TEST_P(ModelStoreTest, HeadersTheTrainerAndTheCliSendAreAccepted) {
  v1::PushHeader header = Header("dogs", "x");
  header.mutable_components(0)->set_format("torchscript");
  header.add_labels("caf\xc3\xa9");
  header.add_labels("\xe7\x8b\x97");
  header.add_labels("\xf0\x9f\x90\x95");
  v1::Preprocessing* p = header.mutable_preprocessing();
  p->set_input_size(224);
  p->set_resize(256);
  for (float v : {0.485f, 0.456f, 0.406f}) p->add_mean(v);
  for (float v : {0.229f, 0.224f, 0.225f}) p->add_std(v);
  absl::Status s = store_->ValidateHeader(header);
  EXPECT_TRUE(s.ok()) << s;
  // Resize 0 means input_size; stretching needs no resize; labels may be
  // left to the model file, and so may the preprocessing.
  p->set_resize(0);
  EXPECT_TRUE(store_->ValidateHeader(header).ok());
  p->set_resize_mode(v1::RESIZE_MODE_STRETCH);
  p->set_color_order(v1::COLOR_ORDER_BGR);
  EXPECT_TRUE(store_->ValidateHeader(header).ok());
  header.clear_labels();
  header.clear_preprocessing();
  EXPECT_TRUE(store_->ValidateHeader(header).ok());
  // A backbone and a head may travel beside the model.
  v1::ComponentSpec* backbone = header.add_components();
  backbone->set_role(v1::COMPONENT_ROLE_BACKBONE);
  backbone->set_digest(Sha256Digest("backbone"));
  backbone->set_size(8);
  EXPECT_TRUE(store_->ValidateHeader(header).ok());
}

INSTANTIATE_TEST_SUITE_P(Backends, ModelStoreTest,
                         ::testing::Values("file", "memory", "file+segments",
                                           "memory+segments"),
                         [](const ::testing::TestParamInfo<std::string>& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '+', '_');
                           return name;
                         });

TEST(ModelStoreSerialisedTest,
     StoreIgnoringExclusiveWritesStillGetsDistinctVersions) {
  auto memory = std::make_shared<storage::MemoryStore>();
  memory->set_ignore_exclusive(true);
  ModelStore store(memory);
  ASSERT_TRUE(store.Init().ok());
  EXPECT_TRUE(store.serialising());
  std::vector<std::thread> threads;
  std::vector<int64_t> versions(8, 0);
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      const std::string bytes = absl::StrCat("m", i);
      auto upload = store.StartBlob(Sha256Digest(bytes), bytes.size());
      ASSERT_TRUE(upload.ok());
      ASSERT_TRUE((*upload)->Write(bytes).ok());
      ASSERT_TRUE((*upload)->Finish().ok());
      v1::PushHeader header;
      header.set_name("dogs");
      auto* c = header.add_components();
      c->set_digest(Sha256Digest(bytes));
      c->set_size(bytes.size());
      auto v = store.Commit(header);
      if (v.ok()) versions[i] = v->version();
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(std::set<int64_t>(versions.begin(), versions.end()),
            (std::set<int64_t>{1, 2, 3, 4, 5, 6, 7, 8}));
}

TEST(ModelStoreSerialisedTest, UnreachableStoreAtStartSerialisesAndReportsIt) {
  auto memory = std::make_shared<storage::MemoryStore>();
  memory->set_failure(absl::UnavailableError("connection refused"));
  ModelStore store(memory);
  absl::Status s = store.Init();
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_TRUE(store.serialising());
  memory->set_failure(absl::OkStatus());
  ASSERT_TRUE(store.Init().ok());
  EXPECT_FALSE(store.serialising());
}

// A memory store whose deletes fail after the first one succeeds.
class OneDeleteStore : public storage::MemoryStore {
 public:
  absl::Status Delete(const std::string& key) override {
    if (deletes_.fetch_add(1) >= 1) {
      return absl::UnavailableError("storage is down");
    }
    return MemoryStore::Delete(key);
  }

 private:
  std::atomic<int> deletes_{0};
};

TEST(ModelStoreGarbageCollectTest, AnOutageMidwaySaysWhatWasRemoved) {
  auto memory = std::make_shared<OneDeleteStore>();
  ModelStore store(memory);
  ASSERT_TRUE(store.Init().ok());
  std::vector<std::string> orphans;
  for (const std::string bytes : {"orphan one", "orphan two", "orphan 3"}) {
    const std::string digest = Sha256Digest(bytes);
    auto upload = store.StartBlob(digest, bytes.size());
    ASSERT_TRUE(upload.ok()) << upload.status();
    ASSERT_TRUE((*upload)->Write(bytes).ok());
    ASSERT_TRUE((*upload)->Finish().ok());
    memory->SetModified(ModelStore::BlobKey(digest),
                        absl::Now() - absl::Hours(2));
    orphans.push_back(digest);
  }
  auto gc = store.GarbageCollect(absl::Hours(1), /*dry_run=*/false);
  ASSERT_TRUE(absl::IsUnavailable(gc.status())) << gc.status();
  EXPECT_THAT(std::string(gc.status().message()),
              HasSubstr("stopped after removing 1 unreferenced blob; run it "
                        "again for the rest: storage is down"));
  auto present = store.PresentBlobs(orphans);
  ASSERT_TRUE(present.ok()) << present.status();
  EXPECT_EQ(present->size(), 2u);
}

// A memory store whose blob reads, once frozen, hang as a frozen S3 gateway
// does: until the deadline of the calling request, or for 10 s when the
// reading thread carries none. It notes whether a read ran off the thread
// that started the request.
class FreezingStore : public storage::MemoryStore {
 public:
  explicit FreezingStore(std::thread::id caller) : caller_(caller) {}
  void Freeze() { frozen_ = true; }
  bool read_on_another_thread() const { return other_thread_; }

  absl::Status Read(const std::string& key, int64_t offset, int64_t length,
                    const storage::ByteSink& sink) override {
    if (!frozen_ || !absl::StartsWith(key, "blobs/sha256/")) {
      return MemoryStore::Read(key, offset, length, sink);
    }
    if (std::this_thread::get_id() != caller_) other_thread_ = true;
    const auto limits = storage::CurrentCallLimits();
    const absl::Time until =
        limits != nullptr ? limits->deadline : absl::Now() + absl::Seconds(10);
    absl::SleepFor(until - absl::Now());
    return absl::UnavailableError("storage did not answer");
  }

 private:
  const std::thread::id caller_;
  std::atomic<bool> frozen_{false};
  std::atomic<bool> other_thread_{false};
};

TEST(ModelStoreDeadlineTest, SegmentReadersStopAtTheCallersDeadline) {
  auto memory = std::make_shared<FreezingStore>(std::this_thread::get_id());
  ModelStoreOptions options;
  options.read_segment_bytes = 1 << 20;  // a 3 MiB blob: three segments
  ModelStore store(memory, options);
  ASSERT_TRUE(store.Init().ok());
  std::string bytes(3 << 20, 'x');
  for (size_t i = 0; i < bytes.size(); i += 4096) bytes[i] = char(i >> 12);
  v1::Component component;
  component.set_digest(Sha256Digest(bytes));
  component.set_size(static_cast<int64_t>(bytes.size()));
  auto upload = store.StartBlob(component.digest(), component.size());
  ASSERT_TRUE(upload.ok()) << upload.status();
  ASSERT_TRUE((*upload)->Write(bytes).ok());
  ASSERT_TRUE((*upload)->Finish().ok());

  memory->Freeze();
  auto limits = std::make_shared<storage::CallLimits>();
  limits->deadline = absl::Now() + absl::Milliseconds(500);
  const storage::ScopedCallLimits scope(limits);
  const absl::Time start = absl::Now();
  absl::Status s = store.ReadBlob(
      component, [](absl::string_view) { return absl::OkStatus(); });
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_TRUE(memory->read_on_another_thread()) << "no segment reader ran";
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
}

}  // namespace
}  // namespace kennel::registry
