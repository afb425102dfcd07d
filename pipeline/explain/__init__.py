"""`rcnn explain`: the lecture's pictures of each step, drawn from what the pipeline cached for an image.

page.py writes the pictures and the explain page of an image; drawing.py holds the drawing helpers the
pictures share; each method's pictures live beside them (one module per family of methods)."""
