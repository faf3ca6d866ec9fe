//! `ambitctl explain`: one flow through the mesh, hop by hop, decided by the proxies' own code.
