"""The modular model: decoder and encoders as separately resident units."""
