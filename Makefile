# The two commands a new user needs: `make demo` and `make test`.
SHELL := bash
CARGO ?= cargo

.PHONY: demo demo-down test lint test-unit test-e2e bench

## demo: local cluster + webhook + the guide's canary example, then a rollback
demo:
	e2e/scripts/demo.sh up

## demo-down: stop the demo's webhook and cluster
demo-down:
	e2e/scripts/demo.sh down

## test: formatting, lints, unit and integration tests, then the end-to-end tests
test: lint test-unit test-e2e

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# The e2e crate's tests need a cluster; test-e2e runs them against one (without it they would
# only report themselves skipped).
test-unit:
	$(CARGO) test --workspace --exclude tensor-fusion-e2e

test-e2e:
	e2e/scripts/run-e2e.sh

## bench: the benchmarks behind docs/benchmarks.md (the in-process ones; the two that need a
## cluster start their own: e2e/scripts/bench-webhook.sh and e2e/scripts/bench-agent.sh)
bench:
	$(CARGO) bench --workspace --exclude tensor-fusion-e2e
