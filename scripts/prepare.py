"""`avllm prepare` as a Hydra script (NeMo convention): python scripts/prepare.py [--config-name NAME] key=value ..."""

from nemo_avllm.cli import hydra_main

main = hydra_main("prepare")

if __name__ == "__main__":
    main()
