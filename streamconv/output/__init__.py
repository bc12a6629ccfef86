"""Where output bytes go and how a folder becomes the output: shard sinks (`sink`), the staging folder,
commit and resume (`staging`, `runlock`, `swapjournal`), the output record (`record`), where an output
may go (`destination`) and shard CRCs without reading back (`crc`).
"""
