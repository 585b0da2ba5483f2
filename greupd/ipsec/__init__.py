"""GRE over IPsec: the connections greupd loads into strongSwan's charon (pure), and the VICI session (I/O).

    Config --desired_connections (pure)--> {name: IpsecConnection}
    IpsecSupervisor: load-conn/load-shared what is missing or changed, unload-conn what greupd loaded and no
                     longer wants; list-sas -> per-tunnel IPsec state; reconnects when charon restarts
"""
