"""`camface guided`: Guided Backprop and Guided Grad-CAM on snapshots and images, in TensorFlow.

Data flow: snapshot.py / image.py (inputs: crops, model, preprocessing) -> gradcam.py (layers,
activations and gradients at any layer; the heatmaps come from camface.methods) + backprop.py (guided ReLU copy, input gradients) ->
explain.py (one Explanation per crop and class) -> figure.py (comparison PNG, per-layer GIF);
cli.py wires them. TensorFlow is imported inside functions only.
"""
