#include "common/server_flags.h"

#include <gtest/gtest.h>

#include <cstring>

#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"

namespace kennel {
namespace {

std::vector<std::string> Rewrite(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  AcceptDashedFlags(static_cast<int>(argv.size()), argv.data());
  return args;
}

TEST(DashedFlagsTest, RewritesFlagNamesOnly) {
  auto out = Rewrite({"prog", "--token-file=/a-b/c-d", "--metrics-listen",
                      "host-1:9", "-0.5", "pos-arg", "--", "--not-a-flag"});
  EXPECT_EQ(out[1], "--token_file=/a-b/c-d");
  EXPECT_EQ(out[2], "--metrics_listen");
  EXPECT_EQ(out[3], "host-1:9");
  EXPECT_EQ(out[4], "-0.5");
  EXPECT_EQ(out[5], "pos-arg");
  EXPECT_EQ(out[7], "--not-a-flag");
}

TEST(ServerFlagsTest, EmptyFlagsTakeTheServiceDefaults) {
  absl::FlagSaver saver;
  ServerOptions o =
      ServerOptionsFromFlags("kennel-x", "127.0.0.1:50051", "127.0.0.1:9101");
  EXPECT_EQ(o.name, "kennel-x");
  EXPECT_EQ(o.listen, "127.0.0.1:50051");
  EXPECT_EQ(o.metrics_listen, "127.0.0.1:9101");
  EXPECT_EQ(o.max_message_bytes, 16 << 20);
  EXPECT_EQ(o.drain_grace, absl::Seconds(30));
}

TEST(ServerFlagsTest, FlagsOverrideDefaults) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_listen, ":6000");
  absl::SetFlag(&FLAGS_metrics_listen, ":9200");
  absl::SetFlag(&FLAGS_max_message_mb, 4);
  absl::SetFlag(&FLAGS_drain_seconds, 2.5);
  absl::SetFlag(&FLAGS_tls_cert, "c.pem");
  absl::SetFlag(&FLAGS_tls_key, "k.pem");
  ServerOptions o =
      ServerOptionsFromFlags("kennel-x", "127.0.0.1:1", "127.0.0.1:2");
  EXPECT_EQ(o.listen, ":6000");  // normalised when bound
  EXPECT_EQ(NormalizeListenAddress(o.listen), "0.0.0.0:6000");
  EXPECT_EQ(o.metrics_listen, "0.0.0.0:9200");
  EXPECT_EQ(o.max_message_bytes, 4 << 20);
  EXPECT_EQ(o.drain_grace, absl::Milliseconds(2500));
  EXPECT_EQ(o.tls_cert, "c.pem");
  EXPECT_EQ(o.tls_key, "k.pem");
}

TEST(ServerFlagsTest, MetricsCanBeSwitchedOff) {
  absl::FlagSaver saver;
  absl::SetFlag(&FLAGS_metrics_listen, "off");
  EXPECT_EQ(ServerOptionsFromFlags("x", "a:1", "b:2").metrics_listen, "");
}

TEST(ServerFlagsTest, ThreadsDefaultToTheCores) {
  absl::FlagSaver saver;
  EXPECT_GE(ThreadsFromFlags(), 1);
  absl::SetFlag(&FLAGS_threads, 3);
  EXPECT_EQ(ThreadsFromFlags(), 3);
}

}  // namespace
}  // namespace kennel
