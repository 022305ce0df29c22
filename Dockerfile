# megatron-jam on an NGC PyTorch image (CUDA, Transformer Engine and apex already inside).
#   docker build -t megatron-jam .
#   docker run --gpus all --ipc=host -it megatron-jam bash examples/pretrain_jam_cross.sh
FROM nvcr.io/nvidia/pytorch:25.01-py3

WORKDIR /workspace/megatron-jam
COPY . .
# Keep the image's torch / TE / apex: install.sh leaves an existing torch alone (JAM_VENV=none: no venv).
ENV JAM_VENV=none
RUN bash scripts/install.sh
ENV JAM_SKIP_INSTALL=1
CMD ["bash"]
