"""What a request brings the model: prompt planning and media (image, audio) decoding."""
