"""`avllm launch` as a Hydra script (NeMo convention): python scripts/launch.py recipe=two_stage executor=slurm ..."""

from nemo_avllm.cli import hydra_main

main = hydra_main("launch")

if __name__ == "__main__":
    main()
