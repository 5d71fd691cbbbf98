# make install: .venv with everything (torch pinned by constraints.txt); make test: the whole suite;
# make demo: a short VideoMAE pretraining through the deepspeed launcher on the real sample clips.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmmae-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# FFmpeg 5.1 runtime libraries on Debian 12 (torchcodec links all seven).
FFMPEG_LIBS := libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavfilter8 libavdevice59
# Without a GPU, DeepSpeed runs on the CPU accelerator with gloo; one thread per process on 2 processes.
CPU_ENV := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || echo "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1")
DEMO_PROCS ?= 2
DEMO_DIR ?= runs/demo

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@# The real Fashion-MNIST files come from Debian's package (tests and the tiny image config use them).
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "note: install Debian's dataset-fashion-mnist for the Fashion-MNIST tests and demo"; fi; \
	fi
	@# torchcodec (the default video backend) loads FFmpeg's shared libraries at run time: Debian 12's runtime packages.
	@if ! ldconfig -p 2>/dev/null | grep -q 'libavdevice\.so\.'; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(FFMPEG_LIBS); \
	  else echo "note: install FFmpeg 4-9's shared libraries ($(FFMPEG_LIBS)) for the torchcodec backend"; fi; \
	fi
	touch $(STAMP)

test: install
	$(PY) -m pytest -q --durations=25

demo: install
	$(CPU_ENV) $(VENV)/bin/deepspeed --num_gpus $(DEMO_PROCS) tools/train.py --config video_mae_tiny.yaml \
	  output_dir=$(DEMO_DIR) train.max_steps=40 train.log_every=5 train.vis_every=20 ds.zero_optimization.stage=2
	@echo "run directory: $(DEMO_DIR) (metrics.jsonl, vis/*.png, model.safetensors, tensorboard/)"

clean:
	rm -rf $(VENV) runs .pytest_cache
