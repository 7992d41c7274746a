# `make image`: build the container image with docker, or podman when docker is absent.
# Included from the top-level Makefile (`include deploy/image.mk`); also usable alone:
#   make -f deploy/image.mk image IMAGE=registry.example/maas-gateway IMAGE_TAG=0.1.0
# Variables: CONTAINER_ENGINE (docker|podman|path), IMAGE, IMAGE_TAG, PYTHON_IMAGE (base image override).

CONTAINER_ENGINE ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
IMAGE ?= maas-gateway
IMAGE_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE_TAG ?= $(IMAGE_VERSION)
IMAGE_REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
IMAGE_CREATED := $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
PYTHON_IMAGE ?=

.PHONY: image
image:
	@if [ -z "$(CONTAINER_ENGINE)" ]; then echo "make image: neither docker nor podman is installed" >&2; exit 1; fi
	$(CONTAINER_ENGINE) build \
		--build-arg VERSION=$(IMAGE_VERSION) \
		--build-arg REVISION=$(IMAGE_REVISION) \
		--build-arg CREATED=$(IMAGE_CREATED) \
		$(if $(PYTHON_IMAGE),--build-arg PYTHON_IMAGE=$(PYTHON_IMAGE)) \
		-t $(IMAGE):$(IMAGE_TAG) .
