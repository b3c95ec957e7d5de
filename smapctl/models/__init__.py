"""Pure nn.Modules: the SMAP tokenizer, its regularizers, and the generators. No I/O, no devices."""
