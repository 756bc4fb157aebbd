"""`camface evaluate`: faithfulness scores of the CAM graph's heatmap methods."""
