# The two commands of the README. Each sets everything up on a fresh machine first.
PY ?= python3

.PHONY: setup train retrieval segment change test test-slow bench
setup:
	bash scripts/setup.sh

# main job: fine-tune a ViT + MuFA on the embedded scene-classification set (CPU: about a minute; --scale 0.7 1.0:
# timm's default crop scale 0.08-1 rescales the textures' stripe frequency, 38.75 % -> 57.5 %, benchmarks/NOTES.md;
# on a GPU with real data: python -m rspeft_fast train --model vit_base_patch16_224 --method mufa --data DIR --pretrained)
train: setup
	$(PY) -m rspeft_fast train --model vit_tiny_patch16_224 --method mufa --global-pool avg --img-size 32 --epochs 4 --lr 1e-2 --scale 0.7 1.0

# retrieval job: MGA on a CPU-sized CLIP, embedded captioned scene set (zero-shot, train, select on val, test);
# on a GPU with real data: python -m rspeft_fast retrieval --model ViT-B-32-quickgelu --checkpoint RS5M_ViT-B-32.pt --data rsitmd --images DIR
retrieval: setup
	$(PY) -m rspeft_fast retrieval --out runs/retrieval-embedded

# dense jobs (UPetu, SPEC §6): EQAM + CAPM on a CPU-sized ConvNeXt + UperNet, embedded land-cover / building-change sets;
# on a GPU with real data: python -m rspeft_fast segment --model convnext_base --checkpoint FILE --data data/loveda --crop 512
segment: setup
	$(PY) -m rspeft_fast segment --out runs/segment-embedded

change: setup
	$(PY) -m rspeft_fast change --out runs/change-embedded

# the test suite (CPU: Triton kernels through TRITON_INTERPRET=1, C++ extension, references, integration, the AOT
# compile of every kernel for sm_86 and sm_90); CI runs this. Tests marked slow are deselected here.
PYTEST = $(PY) -m pytest tests benchmarks -q -n 2 --benchmark-disable -p no:cacheprovider --durations=25
test: setup
	$(PYTEST) -m "not slow"

# what `make test` leaves out: the AOT matrix over every arch and the Triton 3.6 / 3.9 side releases,
# torch.compile variants of the benchmarks on CPU, the longest model tests (README: "Tests")
test-slow: setup
	$(PYTEST) -m slow

bench: setup
	$(PY) -m rspeft_fast bench
