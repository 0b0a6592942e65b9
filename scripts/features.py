"""`avllm features` as a Hydra script (NeMo convention): python scripts/features.py [--config-name NAME] key=value ..."""

from nemo_avllm.cli import hydra_main

main = hydra_main("features")

if __name__ == "__main__":
    main()
