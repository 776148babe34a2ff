# syntax=docker/dockerfile:1
#
# dynamo-dist on top of the official Ray image (same Ray as pyproject.toml pins).
#
#   CPU (default):
#     docker build -t dynamo-dist:0.1.0 .
#   GPU (CUDA 13.0 torch wheels on the Ray GPU image):
#     docker build -t dynamo-dist:0.1.0-gpu \
#       --build-arg BASE_TAG=2.58.0-py311-gpu \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
#
# Push the result to a registry your nodes can pull from and use that name in
# cluster/*.yaml. The image sets no auth token and starts nothing; the cluster
# configs add RAY_AUTH_MODE=token and the dashboard binding.

ARG BASE_TAG=2.58.0-py311
FROM rayproject/ray:${BASE_TAG}
# Re-declared so the value is visible after FROM.
ARG BASE_TAG

# Keep these equal to the pins in pyproject.toml (tests/test_cluster_configs.py checks).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# CPU wheels by default: PyPI's default Linux torch wheel bundles CUDA (GBs of
# nvidia-* packages) that a CPU image never uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The Ray image runs as user "ray" (uid 1000, gid 100 "users"); /app is created
# as root and handed to that user, then we drop back to it.
USER root
RUN mkdir -p /app && chown 1000:100 /app
USER 1000:100
WORKDIR /app

# torch/torchvision first, from the index matching the base image, so that
# `pip install .` finds the pinned versions already satisfied.
RUN pip install --index-url "${TORCH_INDEX_URL}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

COPY --chown=1000:100 . /app
# boto3: the AWS cluster launcher's autoscaler on the head node needs it.
RUN pip install /app boto3 \
 && python -c "import dynamo_dist, ray, torch; assert ray.__version__ == '${BASE_TAG}'.split('-')[0], ray.__version__"
