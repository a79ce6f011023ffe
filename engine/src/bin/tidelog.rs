fn main() {
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound).spawn(|| async {}).unwrap().join().unwrap();
}
