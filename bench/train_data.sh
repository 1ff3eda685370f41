# Sourced by bench/train.sh and bench/resume.sh (after scripts/setup.sh): the synthetic training data of the
# training benchmarks — 200 M3D-Cap cases with 64x64 slices, converted to shards — made under out/bench/train/
# on the first run. Sets DATA.
DATA=out/bench/train
if [ ! -f "$DATA/shards/manifest.json" ]; then
  rm -rf "$DATA/raw" "$DATA/shards"
  "$M3D_BIN" data-prep synth "$DATA/raw" --cap-cases 200 --slice-size 64x64 --seg-datasets 0 --refseg-cases 0
  "$M3D_BIN" data-prep cap --src "$DATA/raw/M3D_Cap" --out "$DATA/shards"
fi
