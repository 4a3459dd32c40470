"""pste_bnn"""
