"""Built-in data of kdforge's demo."""
