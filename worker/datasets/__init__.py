"""Dataset readers: each turns a pulled dataset path into training examples."""
