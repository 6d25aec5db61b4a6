"""thawed.runtime.compress: the offline side -- everything that turns a dense model into a checkpoint.

``pipeline`` (the ``compress`` loop), ``plan`` (codec choices and overrides), ``allocate`` (the
cvxq rate allocation), ``calib_data`` / ``calibrate`` / ``input_stats`` / ``token_freq``
(calibration), ``source`` (reading the dense safetensors), ``train_nwc`` (training the nwc
network) and ``writer`` (writing the checkpoint files). The serving path (``checkpoint``,
``model``, ``loading``, ``generate``, the server) never imports this package; import the
submodule you need, this file imports nothing.
"""
