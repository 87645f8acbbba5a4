# megatron_croc on NVIDIA's PyTorch container, which ships TransformerEngine and apex.
# (Not buildable on our CI machines: they have no Docker engine and no GPU.)
FROM nvcr.io/nvidia/pytorch:25.10-py3
WORKDIR /workspace/megatron_croc
COPY . .
# Keep the container's torch/TE/apex; add megatron-core and the rest without touching torch.
RUN pip install --no-cache-dir megatron-core==0.19.2 scipy sentencepiece tensorboard transformers safetensors tqdm psutil \
 && pip install --no-cache-dir --no-deps -e .
ENV CUDA_DEVICE_MAX_CONNECTIONS=1
ENTRYPOINT ["bash", "examples/pretrain_croc.sh"]
