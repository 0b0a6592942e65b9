"""`avllm curate` as a Hydra script (NeMo convention): python scripts/curate.py input=videos.jsonl out_dir=data/curated ..."""

from nemo_avllm.cli import hydra_main

main = hydra_main("curate")

if __name__ == "__main__":
    main()
