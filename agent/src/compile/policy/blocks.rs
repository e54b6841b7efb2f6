//! ipBlock peers: which blocks an address or prefix belongs to.
//!
//! Every block's cidr and excepts become `IPCACHE` prefixes, so the longest prefix an address
//! matches determines the blocks it is in: the identity of a prefix is the set of blocks that
//! contain it and whose excepts do not.
use std::{collections::HashMap, net::IpAddr};

use ipnet::IpNet;

use crate::store::validate::netpol::cidr;

/// One `ipBlock`: a cidr and the prefixes it leaves out. Parsed from a validated policy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Block {
    pub cidr: IpNet,
    pub except: Vec<IpNet>,
}

impl Block {
    /// The block of a validated `IPBlock`, its prefixes read as Kubernetes reads them
    /// ([`cidr`]: host bits masked off). None when the cidr or an except cannot be read: a
    /// block that might be wider than its author meant allows nothing.
    pub fn parse(cidr_text: &str, except: &[String]) -> Option<Self> {
        let mut except = except
            .iter()
            .map(|e| cidr(e))
            .collect::<Option<Vec<IpNet>>>()?;
        except.sort();
        except.dedup();
        Some(Self {
            cidr: cidr(cidr_text)?,
            except,
        })
    }

    /// Whether every address of `net` is in the block.
    pub fn covers(&self, net: &IpNet) -> bool {
        self.cidr.contains(net) && !self.except.iter().any(|e| e.contains(net))
    }
}

/// The blocks of every policy, indexed by cidr.
#[derive(Debug, Default)]
pub struct Blocks {
    blocks: Vec<Block>,
    by_cidr: HashMap<IpNet, Vec<usize>>,
}

impl Blocks {
    pub fn new(mut blocks: Vec<Block>) -> Self {
        blocks.sort();
        blocks.dedup();
        let mut by_cidr: HashMap<IpNet, Vec<usize>> = HashMap::new();
        for (i, b) in blocks.iter().enumerate() {
            by_cidr.entry(b.cidr).or_default().push(i);
        }
        Self { blocks, by_cidr }
    }

    pub fn all(&self) -> &[Block] {
        &self.blocks
    }

    /// Every prefix `IPCACHE` needs for the blocks: their cidrs and excepts.
    pub fn prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.blocks
            .iter()
            .flat_map(|b| std::iter::once(b.cidr).chain(b.except.iter().copied()))
    }

    /// Indexes (into [`Blocks::all`]) of the blocks covering `net`, sorted. Looks up each
    /// shorter prefix of `net` (at most 129 lookups) instead of scanning every block.
    pub fn covering(&self, net: &IpNet) -> Vec<usize> {
        let mut out = Vec::new();
        for len in 0..=net.prefix_len() {
            let Ok(candidate) = IpNet::new(net.addr(), len) else {
                continue;
            };
            for &i in self.by_cidr.get(&candidate.trunc()).into_iter().flatten() {
                if self.blocks[i].covers(net) {
                    out.push(i);
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// [`Blocks::covering`] for one address.
    pub fn covering_ip(&self, ip: IpAddr) -> Vec<usize> {
        self.covering(&IpNet::from(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    #[test]
    fn excepts_leave_their_prefixes_out() {
        let b = Blocks::new(vec![
            Block::parse("10.0.0.0/8", &["10.1.0.0/16".into()]).expect("block"),
            Block::parse("10.1.2.0/24", &[]).expect("block"),
            Block::parse("fd00::/8", &[]).expect("block"),
        ]);
        assert_eq!(b.covering_ip("10.2.3.4".parse().expect("ip")), [0]);
        assert_eq!(
            b.covering_ip("10.1.3.4".parse().expect("ip")),
            Vec::<usize>::new()
        );
        assert_eq!(b.covering_ip("10.1.2.3".parse().expect("ip")), [1]);
        assert_eq!(b.covering(&net("10.1.0.0/16")), Vec::<usize>::new());
        assert_eq!(b.covering(&net("10.0.0.0/8")), [0]);
        assert_eq!(b.covering_ip("fd00::1".parse().expect("ip")), [2]);
        assert_eq!(
            b.covering_ip("192.168.0.1".parse().expect("ip")),
            Vec::<usize>::new()
        );
        assert_eq!(b.prefixes().count(), 4);
    }

    #[test]
    fn host_bits_are_ignored() {
        let b = Block::parse("10.0.0.1/24", &[]).expect("block");
        assert_eq!(b.cidr, net("10.0.0.0/24"));
    }
}
