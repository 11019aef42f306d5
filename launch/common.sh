# Sourced by the launch scripts: pick CPU or GPU settings once, the same way everywhere.
has_gpu() { python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }
if has_gpu; then
  default_ds_config() { echo ds_configs/zero2_bf16.json; }
  default_nproc() { python3 -c 'import torch; print(torch.cuda.device_count())'; }
else
  export DS_ACCELERATOR=cpu
  # one thread per rank: on a small machine oversubscribed ranks are ~10x slower
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  default_ds_config() { echo ds_configs/zero2_cpu.json; }
  default_nproc() { echo 2; }
fi
