"""`avllm evaluate` as a Hydra script (NeMo convention): python scripts/evaluate.py key=value ..."""

from nemo_avllm.cli import hydra_main

main = hydra_main("evaluate")

if __name__ == "__main__":
    main()
