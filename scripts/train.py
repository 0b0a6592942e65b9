"""`avllm train` as a Hydra script (NeMo convention): python scripts/train.py [--config-name NAME] key=value ..."""

from nemo_avllm.cli import hydra_main

main = hydra_main("train")

if __name__ == "__main__":
    main()
