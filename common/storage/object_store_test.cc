// The ObjectStore contract, run against every implementation: a folder in a
// temp dir, the in-memory store, and S3 when KENNEL_TEST_S3_URL names a
// bucket (the radosgw integration test sets it, with S3_ENDPOINT and the
// AWS_* keys).
#include "common/storage/object_store.h"

#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/sha256.h"
#include "common/storage/file_store.h"
#include "common/storage/memory_store.h"
#include "common/storage/s3_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace kennel::storage {
namespace {

using ::testing::ElementsAre;
using ::testing::IsEmpty;

std::string Random(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string out(n, '\0');
  for (char& c : out) c = static_cast<char>(rng());
  return out;
}

std::string RandomTag() {
  static std::atomic<int> counter{0};
  return absl::StrCat("t", getpid(), "-", counter++, "-",
                      std::random_device{}() % 100000);
}

class ObjectStoreTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const std::string kind = GetParam();
    if (kind == "file") {
      char tmpl[] = "/tmp/kennel-store-test-XXXXXX";
      ASSERT_NE(mkdtemp(tmpl), nullptr);
      dir_ = tmpl;
      auto store = FileStore::Open(dir_);
      ASSERT_TRUE(store.ok()) << store.status();
      store_ = std::move(*store);
    } else if (kind == "memory") {
      store_ = std::make_unique<MemoryStore>();
    } else {
      const char* url = std::getenv("KENNEL_TEST_S3_URL");
      if (url == nullptr) GTEST_SKIP() << "KENNEL_TEST_S3_URL is not set";
      S3Settings settings;
      settings.endpoint =
          std::getenv("S3_ENDPOINT") ? std::getenv("S3_ENDPOINT") : "";
      settings.path_style = true;
      // Small parts so multipart is exercised without large objects.
      settings.multipart_threshold = 6 << 20;
      settings.part_size = 5 << 20;
      auto store =
          OpenObjectStore(absl::StrCat(url, "/", RandomTag()), settings);
      ASSERT_TRUE(store.ok()) << store.status();
      store_ = std::move(*store);
    }
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  std::string dir_;
  std::unique_ptr<ObjectStore> store_;
};

TEST_P(ObjectStoreTest, PutThenReadStatAndRanges) {
  const std::string data = Random(300000, 1);
  ASSERT_TRUE(store_->Put("a/b/c.bin", data, {}).ok());
  auto all = store_->ReadAll("a/b/c.bin");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(*all, data);
  auto info = store_->Stat("a/b/c.bin");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->size, 300000);
  EXPECT_LT(absl::AbsDuration(info->modified - absl::Now()), absl::Minutes(5));
  std::string part;
  ASSERT_TRUE(store_
                  ->Read("a/b/c.bin", 1000, 5000,
                         [&](absl::string_view d) {
                           part.append(d.data(), d.size());
                           return absl::OkStatus();
                         })
                  .ok());
  EXPECT_EQ(part, data.substr(1000, 5000));
  part.clear();
  ASSERT_TRUE(store_
                  ->Read("a/b/c.bin", 299990, -1,
                         [&](absl::string_view d) {
                           part.append(d.data(), d.size());
                           return absl::OkStatus();
                         })
                  .ok());
  EXPECT_EQ(part, data.substr(299990));
}

TEST_P(ObjectStoreTest, MissingKeyIsNotFound) {
  EXPECT_TRUE(absl::IsNotFound(store_->Stat("no/such").status()));
  EXPECT_TRUE(absl::IsNotFound(store_->ReadAll("no/such").status()));
  EXPECT_TRUE(store_->Delete("no/such").ok());
}

TEST_P(ObjectStoreTest, ExclusiveCreateRefusesAnExistingKey) {
  WriteOptions exclusive;
  exclusive.exclusive = true;
  ASSERT_TRUE(store_->Put("m/v/1.json", "first", exclusive).ok());
  absl::Status second = store_->Put("m/v/1.json", "second", exclusive);
  EXPECT_TRUE(absl::IsAlreadyExists(second)) << second;
  EXPECT_EQ(*store_->ReadAll("m/v/1.json"), "first");
  auto probe = store_->CheckExclusiveWrites();
  ASSERT_TRUE(probe.ok()) << probe.status();
  EXPECT_TRUE(*probe);
  // A plain write replaces.
  ASSERT_TRUE(store_->Put("m/v/1.json", "third", {}).ok());
  EXPECT_EQ(*store_->ReadAll("m/v/1.json"), "third");
}

TEST_P(ObjectStoreTest, ConcurrentExclusiveCreatesHaveOneWinner) {
  std::atomic<int> won{0}, lost{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&, i] {
      WriteOptions exclusive;
      exclusive.exclusive = true;
      absl::Status s =
          store_->Put("race/key", absl::StrCat("writer ", i), exclusive);
      if (s.ok()) {
        ++won;
      } else if (absl::IsAlreadyExists(s)) {
        ++lost;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(won.load(), 1);
  EXPECT_EQ(lost.load(), 7);
}

TEST_P(ObjectStoreTest, WriterPublishesOnlyOnCommit) {
  const std::string data = Random(13 << 20, 2);  // several S3 parts
  {
    auto writer = store_->NewWriter("blobs/x", {});
    ASSERT_TRUE(writer.ok()) << writer.status();
    ASSERT_TRUE((*writer)->Write(data.substr(0, 4 << 20)).ok());
    EXPECT_TRUE(absl::IsNotFound(store_->Stat("blobs/x").status()));
    // Dropped without Commit.
  }
  EXPECT_TRUE(absl::IsNotFound(store_->Stat("blobs/x").status()));
  WriteOptions options;
  options.size_hint = static_cast<int64_t>(data.size());
  options.sha256_hex = Sha256Hex(data);
  auto writer = store_->NewWriter("blobs/x", options);
  ASSERT_TRUE(writer.ok()) << writer.status();
  for (size_t at = 0; at < data.size(); at += 1 << 20) {
    ASSERT_TRUE(
        (*writer)->Write(absl::string_view(data).substr(at, 1 << 20)).ok());
  }
  EXPECT_EQ((*writer)->bytes_written(), static_cast<int64_t>(data.size()));
  EXPECT_TRUE(absl::IsNotFound(store_->Stat("blobs/x").status()));
  absl::Status commit = (*writer)->Commit();
  ASSERT_TRUE(commit.ok()) << commit;
  auto read = store_->ReadAll("blobs/x");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(Sha256Hex(*read), Sha256Hex(data));
  EXPECT_EQ(store_->Stat("blobs/x")->size, static_cast<int64_t>(data.size()));
}

TEST_P(ObjectStoreTest, EmptyObject) {
  auto writer = store_->NewWriter("empty", {});
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE((*writer)->Commit().ok());
  EXPECT_EQ(store_->Stat("empty")->size, 0);
  EXPECT_EQ(*store_->ReadAll("empty"), "");
}

TEST_P(ObjectStoreTest, ListsWithDelimiterAndPages) {
  for (const char* key :
       {"models/a/versions/00000001.json", "models/a/versions/00000002.json",
        "models/a/aliases/prod.json", "models/b/versions/00000001.json",
        "blobs/sha256/ff"}) {
    ASSERT_TRUE(store_->Put(key, "x", {}).ok());
  }
  ListOptions top;
  top.prefix = "models/";
  top.delimiter = "/";
  auto names = store_->List(top);
  ASSERT_TRUE(names.ok()) << names.status();
  EXPECT_THAT(names->prefixes, ElementsAre("models/a/", "models/b/"));
  EXPECT_THAT(names->objects, IsEmpty());

  std::vector<std::string> keys;
  ListOptions paged;
  paged.prefix = "models/a/";
  paged.max_keys = 2;
  int pages = 0;
  while (true) {
    auto page = store_->List(paged);
    ASSERT_TRUE(page.ok()) << page.status();
    ++pages;
    for (const auto& o : page->objects) keys.push_back(o.key);
    if (page->next_page_token.empty()) break;
    paged.page_token = page->next_page_token;
  }
  EXPECT_EQ(pages, 2);
  EXPECT_THAT(keys, ElementsAre("models/a/aliases/prod.json",
                                "models/a/versions/00000001.json",
                                "models/a/versions/00000002.json"));
  auto all = store_->ListAll("models/a/versions/");
  ASSERT_TRUE(all.ok());
  ASSERT_EQ(all->size(), 2u);
  EXPECT_EQ((*all)[0].size, 1);

  ASSERT_TRUE(store_->Delete("models/b/versions/00000001.json").ok());
  names = store_->List(top);
  ASSERT_TRUE(names.ok());
  EXPECT_THAT(names->prefixes, ElementsAre("models/a/"));
}

TEST_P(ObjectStoreTest, RefusesKeysThatLeaveTheRoot) {
  for (const char* key :
       {"../x", "/abs", "a//b", "a/./b", "", "a/b/", "sp ace"}) {
    EXPECT_TRUE(absl::IsInvalidArgument(store_->Put(key, "x", {}))) << key;
    EXPECT_TRUE(absl::IsInvalidArgument(store_->Stat(key).status())) << key;
  }
}

TEST_P(ObjectStoreTest, SinkErrorStopsARead) {
  ASSERT_TRUE(store_->Put("big", Random(2 << 20, 3), {}).ok());
  int calls = 0;
  absl::Status s = store_->Read("big", 0, -1, [&](absl::string_view) {
    ++calls;
    return absl::CancelledError("client went away");
  });
  EXPECT_TRUE(absl::IsCancelled(s)) << s;
  EXPECT_EQ(calls, 1);
}

TEST_P(ObjectStoreTest, ReadPiecesCutsExactPiecesAndMayKeepThem) {
  const std::string data = Random((3 << 20) + 12345, 4);
  ASSERT_TRUE(store_->Put("pieces", data, {}).ok());
  for (int64_t piece_bytes : {int64_t{1} << 20, int64_t{65536}, int64_t{7}}) {
    if (piece_bytes == 7) {
      // Tiny pieces over a small range only.
      std::vector<std::string> got;
      ASSERT_TRUE(store_
                      ->ReadPieces("pieces", 100, 30, piece_bytes,
                                   [&](std::string* piece) {
                                     got.push_back(*piece);
                                     return absl::OkStatus();
                                   })
                      .ok());
      EXPECT_THAT(got, ElementsAre(data.substr(100, 7), data.substr(107, 7),
                                   data.substr(114, 7), data.substr(121, 7),
                                   data.substr(128, 2)));
      continue;
    }
    SCOPED_TRACE(piece_bytes);
    // The sink takes each piece and hands back a used buffer of another
    // size, as a caller recycling its message buffers does.
    std::string recycled(100, 'z');
    std::string joined;
    int64_t pieces = 0;
    absl::Status s =
        store_->ReadPieces("pieces", 0, -1, piece_bytes, [&](std::string* p) {
          const bool last = joined.size() + p->size() == data.size();
          EXPECT_TRUE(static_cast<int64_t>(p->size()) == piece_bytes || last)
              << p->size();
          joined += *p;
          ++pieces;
          p->swap(recycled);
          return absl::OkStatus();
        });
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(joined, data);
    EXPECT_EQ(pieces, (static_cast<int64_t>(data.size()) + piece_bytes - 1) /
                          piece_bytes);
  }
  std::string tail;
  ASSERT_TRUE(store_
                  ->ReadPieces("pieces", 3 << 20, -1, 1 << 20,
                               [&](std::string* p) {
                                 tail += *p;
                                 return absl::OkStatus();
                               })
                  .ok());
  EXPECT_EQ(tail, data.substr(3 << 20));

  int calls = 0;
  absl::Status stopped =
      store_->ReadPieces("pieces", 0, -1, 1 << 20, [&](std::string*) {
        ++calls;
        return absl::CancelledError("client went away");
      });
  EXPECT_TRUE(absl::IsCancelled(stopped)) << stopped;
  EXPECT_EQ(calls, 1);
  absl::Status missing = store_->ReadPieces(
      "absent", 0, -1, 1 << 20, [](std::string*) { return absl::OkStatus(); });
  EXPECT_TRUE(absl::IsNotFound(missing)) << missing;
}

INSTANTIATE_TEST_SUITE_P(Backends, ObjectStoreTest,
                         ::testing::Values("file", "memory", "s3"));

TEST(FileStoreTest, CleanStagingRemovesOldLeftovers) {
  char tmpl[] = "/tmp/kennel-store-test-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  auto store = FileStore::Open(tmpl);
  ASSERT_TRUE(store.ok());
  auto writer = (*store)->NewWriter("k", {});
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE((*writer)->Write("abc").ok());
  // Simulate a crash: the staging file outlives its writer.
  int staged = 0;
  for (auto& e :
       std::filesystem::directory_iterator(std::string(tmpl) + "/.staging")) {
    std::filesystem::copy_file(e.path(), e.path().string() + "-copy");
    ++staged;
  }
  ASSERT_EQ(staged, 1);
  writer->reset();
  EXPECT_EQ(*(*store)->CleanStaging(absl::Now() - absl::Hours(1)), 0);
  EXPECT_EQ(*(*store)->CleanStaging(absl::Now() + absl::Seconds(1)), 1);
  EXPECT_TRUE(std::filesystem::is_empty(std::string(tmpl) + "/.staging"));
  std::filesystem::remove_all(tmpl);
}

TEST(MemoryStoreTest, CanIgnoreExclusiveWritesLikeS3rver) {
  MemoryStore store;
  store.set_ignore_exclusive(true);
  EXPECT_FALSE(*store.CheckExclusiveWrites());
  WriteOptions exclusive;
  exclusive.exclusive = true;
  EXPECT_TRUE(store.Put("k", "1", exclusive).ok());
  EXPECT_TRUE(store.Put("k", "2", exclusive).ok());
}

TEST(OpenObjectStoreTest, RejectsUnknownSchemes) {
  EXPECT_TRUE(absl::IsInvalidArgument(OpenObjectStore("ftp://x", {}).status()));
  EXPECT_TRUE(
      absl::IsInvalidArgument(OpenObjectStore("file://relative", {}).status()));
  EXPECT_TRUE(
      absl::IsInvalidArgument(OpenObjectStore("s3://A_B", {}).status()));
  S3Settings bad;
  bad.endpoint = "127.0.0.1:9000";
  EXPECT_TRUE(
      absl::IsInvalidArgument(OpenObjectStore("s3://bucket", bad).status()));
}

TEST(S3StoreTest, UnreachableEndpointIsUnavailableQuickly) {
  S3Settings settings;
  settings.endpoint = "http://127.0.0.1:1";  // nothing listens on port 1
  settings.path_style = true;
  settings.access_key = "k";
  settings.secret_key = "s";
  auto store = S3Store::Open("bucket", "", settings);
  ASSERT_TRUE(store.ok());
  absl::Time start = absl::Now();
  absl::Status s = (*store)->Put("k", "x", {});
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("5 attempts"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

}  // namespace
}  // namespace kennel::storage
