# keyrack: the everyday commands. The README gives the same ones.
.PHONY: run test browser-test slow-tests bench bench-start cost fmt lint ci fuzz-api faults load fuzz fuzz-http replicate-drill replicate-drill-s3 check-unit

run:
	cargo run --release

test:
	cargo test

# The page in headless Chromium: installs chromium, chromium-driver (apt-get) and selenium (in
# target/browser-venv) when missing; screenshots land in target/browser-screenshots/.
browser-test:
	bash tests/browser/setup.sh
	KEYRACK_BROWSER_TESTS=required cargo test --test api page:: -- --include-ignored --nocapture

# The end-to-end tests too slow for the quick `cargo test` (marked #[ignore], each saying why):
# the browser walk and the scale tests. CI runs them as their own step, the browser required.
slow-tests:
	bash tests/browser/setup.sh
	KEYRACK_BROWSER_TESTS=required cargo test --test api -- --ignored --test-threads 1

bench:
	bash benches/run.sh

# Only the start-up part of `make bench`: start to ready line against the bare tiny_http server
# (:memory: and a fresh file), and fifty servers at once (PSS, threads). See docs/harness.md.
bench-start:
	cargo build --release --bin keyrack --example baseline --example start_to_ready
	python3 benches/start.py target/release/keyrack target/release/examples/baseline \
	  target/release/examples/start_to_ready

# Instructions per request under callgrind (valgrind): for a machine shared with other work.
cost:
	bash benches/cost.sh

fmt:
	cargo fmt --all

lint:
	cargo fmt --all --check
	cargo clippy --all-targets --locked -- -D warnings

ci:
	bash .ci/run

fuzz-api:
	bash tests/scripts/fuzz-api.sh

faults:
	bash tests/scripts/faults.sh

# keyrack under Litestream, kill -9 of both, restore, count: see tests/scripts/replicate_drill.py.
replicate-drill:
	bash tests/scripts/replicate-drill.sh

# The same with an S3 replica (moto's S3-compatible server on 127.0.0.1) and deploy/litestream.yml.
replicate-drill-s3:
	DRILL_REPLICA=s3 bash tests/scripts/replicate-drill.sh

# deploy/keyrack.service and deploy/keyrack-litestream.service: systemd-analyze verify and
# security (exposure at most 2.0 each), keyrack's LimitNOFILE=; see docs/deploy.md.
check-unit:
	bash tests/scripts/check-unit.sh

load:
	cargo build --release --bin keyrack
	python3 tests/scripts/load.py target/release/keyrack 60

fuzz:
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run request -- -max_total_time=$${FUZZ_SECONDS:-600}

# The HTTP layer (patched tiny_http) over a real socket: see fuzz/fuzz_targets/http_head.rs.
fuzz-http:
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run http_head -- -max_total_time=$${FUZZ_SECONDS:-600}
