// Lets every Kennel command line spell flags with dashes (--token-file) as
// well as absl's underscores (--token_file).
#ifndef KENNEL_COMMON_DASHED_FLAGS_H_
#define KENNEL_COMMON_DASHED_FLAGS_H_

namespace kennel {

// Rewrites "--flag-name" and "--flag-name=v" into "--flag_name" in place,
// stopping at "--". Values and positional arguments are left alone.
void AcceptDashedFlags(int argc, char** argv);

}  // namespace kennel

#endif  // KENNEL_COMMON_DASHED_FLAGS_H_
