#!/usr/bin/env bash
# jaxdiff against diffusers on one NVIDIA GPU, the DDPM paper's two speed figures (arXiv 2006.11239,
# App. B, TPU v3-8: 21 training steps/s at batch 128, and 17 s to sample 256 images with 1000
# steps), in under 8 minutes before the DiT rows (3., not yet timed on a GPU):
#   1. train steps/s, DDPM CIFAR-10 U-Net (35.7M), batch 128, float32 and bfloat16:
#      jaxdiff's train step against torch eager, bf16 autocast and torch.compile;
#   2. DDPM 1000 steps for 256 images: jaxdiff.sample against diffusers' DDPMScheduler loop;
#   3. DiT-B/2 (arXiv 2212.09748) forward and train step at batch 64 against diffusers'
#      DiTTransformer2DModel, torch eager (benchmarks/dit.py).
#
#   bash benchmarks/gpu.sh                    # installs what is missing from PyPI, then measures
#   bash benchmarks/gpu.sh --wheels DIR       # the same from a folder of wheels (no internet)
#   bash benchmarks/gpu.sh --download DIR     # here: fetch those wheels for the GPU machine
#   bash benchmarks/gpu.sh --quick            # the same plumbing at toy sizes (CPU is fine)
#
# A bare machine needs Python 3 with pip; jax with its CUDA plugin and torch with CUDA are used as
# found (`pip install -e '.[cuda12,bench]'` installs both where they are missing). Results go to
# benchmarks/results/gpu_*.json and the log to benchmarks/results/gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# What jaxdiff's train step and the diffusers peer import, as pip names, for a machine that has
# jax, torch and the scientific stack but not these.
EXTRA=(ml-collections tensorboardX diffusers importlib-metadata zipp absl-py tqdm optax chex
       flax orbax-checkpoint safetensors scikit-learn pillow psutil)

mode=run wheels="" quick=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --download) mode=download; wheels=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    *) echo "unknown argument $1 (see the top of $0)" >&2; exit 2 ;;
  esac
done

if [ "$mode" = download ]; then
  # Wheels for the lent H200 machines' Python 3.12 (see the device notes); only what is missing.
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$wheels" ml-collections tensorboardX diffusers \
    importlib-metadata zipp
  echo "wheels in $wheels: $(ls "$wheels" | tr '\n' ' ')"
  exit 0
fi

modules() {  # the import names of EXTRA that this Python lacks, as pip names
  "$PYTHON" - "${EXTRA[@]}" <<'EOF'
import importlib.util, sys
names = {"ml-collections": "ml_collections", "tensorboardX": "tensorboardX",
         "importlib-metadata": "importlib_metadata", "absl-py": "absl", "pillow": "PIL",
         "orbax-checkpoint": "orbax.checkpoint", "scikit-learn": "sklearn"}
missing = []
for pip_name in sys.argv[1:]:
    module = names.get(pip_name, pip_name.replace("-", "_"))
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        missing.append(pip_name)
print(" ".join(missing))
EOF
}

missing=$(modules)
if [ -n "$missing" ]; then
  echo "installing: $missing"
  if [ -n "$wheels" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/jaxdiff-site "$wheels"/*.whl
    export PYTHONPATH=/tmp/jaxdiff-site${PYTHONPATH:+:$PYTHONPATH}
  else
    "$PYTHON" -m pip install -q $missing
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

"$PYTHON" - <<'EOF'
import jax, torch
print(f"jax {jax.__version__} on {jax.devices()}; torch {torch.__version__}, "
      f"cuda {torch.cuda.is_available()}")
EOF

mkdir -p benchmarks/results
if [ "$quick" = 1 ]; then
  train=(--configs tiny --batch 4 --repeats 2) sample=(--configs tiny --batch 4 --ddpm-steps 20)
  dit=(--configs dit_s2 --batch 2 --repeats 2)
else
  train=(--configs ddpm_cifar10 --batch 128 --repeats 10)
  sample=(--configs ddpm_cifar10 --batch 256 --ddpm-steps 1000 --repeats 1)
  dit=(--configs dit_b2 --batch 64 --repeats 10)
fi
{
  "$PYTHON" benchmarks/train_step.py --no-cpu-variants "${train[@]}"
  cp benchmarks/results/train_step.json benchmarks/results/gpu_train_step.json
  "$PYTHON" benchmarks/sampling.py --no-cpu-variants --methods ddpm "${sample[@]}"
  cp benchmarks/results/sampling.json benchmarks/results/gpu_sampling.json
  "$PYTHON" benchmarks/dit.py "${dit[@]}"
  cp benchmarks/results/dit.json benchmarks/results/gpu_dit.json
  "$PYTHON" - <<'EOF'
import json
train = json.load(open("benchmarks/results/gpu_train_step.json"))["results"]
sample = json.load(open("benchmarks/results/gpu_sampling.json"))["results"]
print("\nAgainst the DDPM paper (TPU v3-8): 21 train steps/s at batch 128; 17 s for 256 samples")
for r in train:
    if "median_s" in r:
        print(f"  train {r['impl']:13s} {r['dtype']:8s}: {1 / r['median_s']:6.2f} steps/s "
              f"(batch {r['batch']})")
for r in sample:
    if "median_s" in r:
        print(f"  DDPM {r['steps']} steps, {r['batch']} images, {r['impl']:5s}: "
              f"{r['median_s']:6.1f} s")
EOF
} 2>&1 | tee benchmarks/results/gpu.log
