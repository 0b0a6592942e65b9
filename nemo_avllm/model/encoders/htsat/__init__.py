"""HTS-AT (Ke Chen et al.), the audio tower of LAION-CLAP, as laion_clap 1.1.7 ships it in
`laion_clap/clap_module/htsat.py` (CC0 1.0 Universal), kept here so that HTSAT builds without the
laion-clap package, whose `numpy<2` requirement cannot be installed into NGC images (numpy 2.x
pinned in /etc/pip/constraint.txt). Module and parameter names, and so checkpoints and outputs, are
laion_clap's. Its one file is split by idea: `layers` (patch embedding, MLP, stochastic depth,
weight init, windowing; `do_mixup` and `interpolate` from laion_clap's `utils.py`), `swin` (the
Swin Transformer window attention, blocks and stages) and `model` (`HTSAT_Swin_Transformer`: the
log-mel front end, the Swin stages and the token-semantic head). Code otherwise unchanged, except
that the resize step shared by `reshape_wav2img` and `repeat_wat2img` is one method. Left out:
`create_htsat_model` (nemo_avllm builds the model itself) and the feature-fusion modules
(`feature_fusion.py`; fusion checkpoints are refused on load).
"""
