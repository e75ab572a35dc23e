# The README's commands. Each one installs what is missing first.
#   make test   install, configure, build, run every test (unit + integration)
#   make demo   install, build, run the whole job end to end on loopback
#   make bench  install, build, run the benchmarks and write one report
BUILD_DIR ?= build
CTEST_ARGS ?=
JOBS ?= $(shell nproc)

.PHONY: all setup configure build test unit demo bench clean

all: build

setup:
	@scripts/setup.sh

configure: setup
	@cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	@cd $(BUILD_DIR) && ctest --output-on-failure --timeout 900 -j $(JOBS) $(CTEST_ARGS)

unit: build
	@cd $(BUILD_DIR) && ctest --output-on-failure -L unit -j $(JOBS) $(CTEST_ARGS)

demo: build
	@scripts/demo.sh $(BUILD_DIR)

bench: build
	@scripts/bench.sh $(BUILD_DIR)

clean:
	rm -rf $(BUILD_DIR)
