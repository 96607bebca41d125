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

test-unit:
	$(CARGO) test --workspace

test-e2e:
	e2e/scripts/run-e2e.sh

## bench: the benchmarks behind docs/benchmarks.md
bench:
	$(CARGO) bench --workspace
